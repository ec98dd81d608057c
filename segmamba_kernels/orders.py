"""Scan orders (docs/design.md §3): the order in which a scan walks the L tokens of a sequence.

``forward`` walks them as laid out, ``reverse`` backwards, and ``inter_slice`` views them as an
(n_slices, L / n_slices) grid of slices by in-slice positions and walks it column by column: one
in-slice position through every slice, then the next. The kernels take the order and read and
write through it; the functions here materialise it, which is how the reference backend computes
an op in an order: ``from_order(op(to_order(x)))``.
"""

from __future__ import annotations

from torch import Tensor

from .checks import ORDERS, check_order

__all__ = ["ORDERS", "backend_order", "from_order", "to_order"]


def backend_order(order: str, n_slices: int) -> tuple[bool, int]:
    """The backends' keywords for an order: (reverse, slices), slices = 1 unless inter-slice."""
    return order == "reverse", (n_slices if order == "inter_slice" else 1)


def to_order(t: Tensor, order: str, n_slices: int) -> Tensor:
    """The tokens of ``t`` (..., L) permuted into scan order: element t of the result is scan step t."""
    check_order(order, n_slices, t.shape[-1])
    if order == "forward":
        return t
    if order == "reverse":
        return t.flip(-1)
    return t.unflatten(-1, (n_slices, -1)).transpose(-1, -2).flatten(-2)


def from_order(t: Tensor, order: str, n_slices: int) -> Tensor:
    """Inverse of :func:`to_order`: tokens in scan order back to their memory (flattened) order."""
    check_order(order, n_slices, t.shape[-1])
    if order == "forward":
        return t
    if order == "reverse":
        return t.flip(-1)
    return t.unflatten(-1, (-1, n_slices)).transpose(-1, -2).flatten(-2)
