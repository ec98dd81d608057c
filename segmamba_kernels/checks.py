"""Argument checks shared by every backend: clear errors naming the argument,
the expected and the given value. Nothing here corrects bad input."""

from __future__ import annotations

import torch
from torch import Tensor

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ACTIVATIONS = (None, "silu", "swish")
ORDERS = ("forward", "reverse", "inter_slice")  # scan orders, docs/design.md §3


def _tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _shape(name: str, t: Tensor, expected: tuple, meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def _rank(name: str, t: Tensor, ranks: tuple[int, ...], meaning: str) -> None:
    if t.dim() not in ranks:
        raise ValueError(f"{name}: expected a {meaning} tensor ({' or '.join(map(str, ranks))}-D), "
                         f"got {t.dim()}-D with shape {tuple(t.shape)}")


def _float(name: str, t: Tensor) -> None:
    if t.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name}: expected dtype in (float32, bfloat16, float16, float64), got {t.dtype}")


def _same_device(named: dict[str, Tensor | None]) -> None:
    present = {k: v for k, v in named.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias) -> int:
    """Validate scan arguments; returns the number of B/C groups."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        _tensor(name, t)
        _float(name, t)
    for name, t in (("D", D), ("z", z), ("delta_bias", delta_bias)):
        if t is not None:
            _tensor(name, t)
            _float(name, t)
    _rank("u", u, (3,), "(batch, dim, L)")
    batch, dim, L = u.shape
    if L < 1:
        raise ValueError(f"u: expected sequence length L >= 1, got shape {tuple(u.shape)}")
    _shape("delta", delta, (batch, dim, L), "(batch, dim, L) like u")
    _rank("A", A, (2,), "(dim, N)")
    if A.shape[0] != dim:
        raise ValueError(f"A: expected shape (dim, N) with dim = {dim} (from u), got {tuple(A.shape)}")
    if A.is_complex():
        raise TypeError("A: complex A is not supported, expected a real tensor")
    N = A.shape[1]
    if N < 1:
        raise ValueError(f"A: expected N >= 1 states, got shape {tuple(A.shape)}")
    _rank("B", B, (3, 4), "(batch, N, L) or (batch, groups, N, L)")
    groups = 1 if B.dim() == 3 else B.shape[1]
    if B.dim() == 3:
        _shape("B", B, (batch, N, L), "(batch, N, L)")
    else:
        _shape("B", B, (batch, groups, N, L), "(batch, groups, N, L)")
    if groups < 1 or dim % groups != 0:
        raise ValueError(f"B: groups must divide dim = {dim}, got groups = {groups}")
    _rank("C", C, (3, 4), "(batch, N, L) or (batch, groups, N, L)")
    if C.dim() == 3:
        _shape("C", C, (batch, N, L), "(batch, N, L) like B")
    else:
        _shape("C", C, (batch, groups, N, L), "(batch, groups, N, L) like B")
    if (C.dim() == 3) != (B.dim() == 3) and groups != 1:
        raise ValueError(f"C: expected the same layout as B {tuple(B.shape)}, got {tuple(C.shape)}")
    if D is not None:
        _shape("D", D, (dim,), "(dim,)")
    if z is not None:
        _shape("z", z, (batch, dim, L), "(batch, dim, L) like u")
    if delta_bias is not None:
        _shape("delta_bias", delta_bias, (dim,), "(dim,)")
    _same_device({"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias})
    return groups


def check_causal_conv1d_args(x, weight, bias, activation) -> None:
    _tensor("x", x)
    _tensor("weight", weight)
    _float("x", x)
    _float("weight", weight)
    _rank("x", x, (3,), "(batch, dim, L)")
    batch, dim, L = x.shape
    if L < 1:
        raise ValueError(f"x: expected sequence length L >= 1, got shape {tuple(x.shape)}")
    _rank("weight", weight, (2,), "(dim, width)")
    if weight.shape[0] != dim:
        raise ValueError(f"weight: expected shape (dim, width) with dim = {dim} (from x), got {tuple(weight.shape)}")
    width = weight.shape[1]
    if not 2 <= width <= 4:
        raise ValueError(f"weight: expected width in 2..4, got width = {width} (shape {tuple(weight.shape)})")
    if bias is not None:
        _tensor("bias", bias)
        _float("bias", bias)
        _shape("bias", bias, (dim,), "(dim,)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected None, 'silu' or 'swish', got {activation!r}")
    _same_device({"x": x, "weight": weight, "bias": bias})


def check_order(order: object, n_slices: object, L: int) -> None:
    """A scan order and slice count for sequences of length L (n_slices matters only for inter_slice,
    but must divide L whatever the order, so that a bad value is never silently ignored)."""
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, torch.SymInt)):
        raise TypeError(f"n_slices: expected an int, got {type(n_slices).__name__}")
    if n_slices < 1 or L % n_slices != 0:
        raise ValueError(f"n_slices: expected a positive divisor of the sequence length L = {L}, got {n_slices}")
