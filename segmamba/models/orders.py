"""The three token orders that tri-orientated Mamba scans (docs/design.md §4).

Tokens are the flattened (depth, height, width) feature map, depth outermost, laid out
along the last axis of a (batch, channels, L) tensor. The scan runs along that axis, so a
direction is just a permutation of it, applied before the scan and undone after.
"""

from __future__ import annotations

from torch import Tensor

ORDERS = ("forward", "reverse", "inter_slice")


def _check(t: Tensor, order: str, n_slices: int) -> None:
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    if n_slices < 1 or t.shape[-1] % n_slices != 0:
        raise ValueError(f"n_slices: expected a positive divisor of the token count {t.shape[-1]}, got {n_slices}")


def to_order(t: Tensor, order: str, n_slices: int) -> Tensor:
    """Permute the tokens of ``t`` (..., L) into the scan order ``order``.

    ``inter_slice`` views the tokens as a (n_slices, L / n_slices) grid and transposes it,
    so consecutive tokens are the same in-slice position on successive slices.
    """
    _check(t, order, n_slices)
    if order == "forward":
        return t
    if order == "reverse":
        return t.flip(-1)
    return t.unflatten(-1, (n_slices, -1)).transpose(-1, -2).flatten(-2)


def from_order(t: Tensor, order: str, n_slices: int) -> Tensor:
    """Inverse of :func:`to_order`: put tokens scanned in ``order`` back in flattened order."""
    _check(t, order, n_slices)
    if order == "forward":
        return t
    if order == "reverse":
        return t.flip(-1)
    return t.unflatten(-1, (-1, n_slices)).transpose(-1, -2).flatten(-2)
