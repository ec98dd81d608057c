"""Pure-PyTorch reference implementations of the two ops (docs/design.md §3).

Readable over fast: a sequential loop over L that follows the math line by line.
Works for any floating dtype, float64 included; the scan state is kept in
float32 (float64 when the inputs are float64) as the contract demands.
Autograd through these functions is the reference for every backend's gradients.
A scan order is computed as ``from_order(op(to_order(x)))`` (segmamba_kernels.orders).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_order
from .orders import from_order, to_order


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    order: str = "forward",
    n_slices: int = 1,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan, sequential over L in scan order ``order``. Shapes as in
    :func:`segmamba_kernels.selective_scan`; ``last_state`` is the state after the last scan step."""
    check_order(order, n_slices, u.shape[-1])
    if order != "forward":
        along = lambda t: None if t is None else to_order(t, order, n_slices)  # noqa: E731
        out, h = selective_scan_ref(along(u), along(delta), A, along(B), along(C), D, along(z), delta_bias,
                                    delta_softplus, True)
        out = from_order(out, order, n_slices)
        return (out, h) if return_last_state else out
    out_dtype = u.dtype
    cdt = _compute_dtype(u, delta, A, B, C)
    u, delta, A = u.to(cdt), delta.to(cdt), A.to(cdt)
    batch, dim, L = u.shape
    N = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # B/C: (batch, N, L) is one group shared by all channels.
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    groups = B.shape[1]
    # Expand groups to channels: channel d belongs to group d // (dim // groups).
    B = B.to(cdt).repeat_interleave(dim // groups, dim=1)  # (batch, dim, N, L)
    C = C.to(cdt).repeat_interleave(dim // groups, dim=1)

    h = u.new_zeros(batch, dim, N)
    ys = []
    for t in range(L):
        dt = delta[:, :, t, None]  # (batch, dim, 1)
        h = torch.exp(dt * A) * h + dt * B[:, :, :, t] * u[:, :, t, None]
        ys.append((h * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(cdt)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(out_dtype)
    return (out, h) if return_last_state else out


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    *,
    order: str = "forward",
    n_slices: int = 1,
) -> Tensor:
    """Causal depthwise conv1d: out[:, d, t] = bias[d] + sum_k w[d, k] x[:, d, t-(W-1)+k], t the
    scan step of order ``order``."""
    check_order(order, n_slices, x.shape[-1])
    if order != "forward":
        out = causal_conv1d_ref(to_order(x, order, n_slices), weight, bias, activation)
        return from_order(out, order, n_slices)
    out_dtype = x.dtype
    cdt = _compute_dtype(x, weight)
    dim, width = weight.shape
    xp = F.pad(x.to(cdt), (width - 1, 0))
    out = F.conv1d(xp, weight.to(cdt).unsqueeze(1), None if bias is None else bias.to(cdt), groups=dim)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out.to(out_dtype)
