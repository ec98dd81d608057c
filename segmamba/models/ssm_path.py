"""One direction of the Mamba inner path, with recomputation in the backward.

Per direction: causal depthwise conv (SiLU) -> x_proj -> dt_proj -> selective scan gated
by z, in that direction's token order. The conv and the scan walk the order themselves
(their ``order`` argument); the projections are token-wise, so everything stays in token
order and no permuted copy is made. :func:`direction_path` is the plain composition;
:func:`ssm_direction` runs it as one custom op that keeps only its input ``xz`` (shared by
all three directions) and the weights for the backward, and recomputes the conv output,
the projections and the scan there, under the autocast state of the forward. Activation
memory per direction is therefore nothing beyond the shared ``xz``, instead of about six
(batch, d_inner, L) tensors.

The op is a ``torch.library`` custom op rather than an autograd.Function because the
backward needs ``torch.autograd.grad`` through the kernels, which dynamo does not trace in
an autograd.Function (a graph break) but AOTAutograd does trace in a custom op's
registered backward, so ``torch.compile(model, fullgraph=True)`` works on every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from segmamba_kernels import causal_conv1d, selective_scan


def project(weight: Tensor, x: Tensor) -> Tensor:
    """weight (out, in) applied to every token of x (batch, in, L): (batch, out, L), written in that
    layout by the GEMM itself (torch.matmul computes the transposed product and copies it)."""
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def direction_path(
    xz: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor,
    x_proj_weight: Tensor,
    dt_proj_weight: Tensor,
    dt_proj_bias: Tensor,
    A_log: Tensor,
    D: Tensor,
    order: str,
    n_slices: int,
    backend: str = "auto",
) -> Tensor:
    """The inner path of one direction, differentiated by plain autograd.

    xz: (batch, 2 * d_inner, L), the in_proj output in flattened token order (x then z);
    conv_weight: (d_inner, d_conv); x_proj_weight: (dt_rank + 2N, d_inner);
    dt_proj_weight: (d_inner, dt_rank); dt_proj_bias, D: (d_inner,); A_log: (d_inner, N).
    Returns (batch, d_inner, L) in flattened token order, in xz's dtype (under autocast: the
    dtype autocast gives the projections).
    """
    d_inner = A_log.shape[0]
    return halves_path(xz[:, :d_inner], xz[:, d_inner:], conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                       dt_proj_bias, A_log, D, order, n_slices, backend)


def halves_path(x: Tensor, z: Tensor, conv_weight: Tensor, conv_bias: Tensor, x_proj_weight: Tensor,
                dt_proj_weight: Tensor, dt_proj_bias: Tensor, A_log: Tensor, D: Tensor, order: str, n_slices: int,
                backend: str = "auto") -> Tensor:
    """:func:`direction_path` given the two halves x, z (batch, d_inner, L) of xz."""
    n_state = A_log.shape[1]
    dt_rank = dt_proj_weight.shape[1]
    # The scan's own parameters stay in its compute dtype (float32, float64 for float64 input).
    scan_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    walk = dict(order=order, n_slices=n_slices, backend=backend)
    xc = causal_conv1d(x, conv_weight, conv_bias, activation="silu", **walk)
    dt_low, B, C = project(x_proj_weight.to(xc.dtype), xc).split([dt_rank, n_state, n_state], dim=1)
    dt = project(dt_proj_weight.to(xc.dtype), dt_low)
    return selective_scan(xc, dt, -torch.exp(A_log.to(scan_dtype)), B, C, D.to(scan_dtype), z=z,
                          delta_bias=dt_proj_bias.to(scan_dtype), delta_softplus=True, **walk)


@torch.library.custom_op("segmamba_model::ssm_direction", mutates_args=())
def _ssm_direction(xz: Tensor, conv_weight: Tensor, conv_bias: Tensor, x_proj_weight: Tensor,
                   dt_proj_weight: Tensor, dt_proj_bias: Tensor, A_log: Tensor, D: Tensor,
                   order: str, n_slices: int, backend: str) -> Tensor:
    return direction_path(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
                          order, n_slices, backend)


@_ssm_direction.register_fake
def _(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, order, n_slices, backend):
    return xz.new_empty((xz.shape[0], A_log.shape[0], xz.shape[2]))


_N_TENSORS = 8


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:_N_TENSORS])
    ctx.order, ctx.n_slices, ctx.backend = inputs[_N_TENSORS:]
    # The backward recomputes the forward, which must see the same autocast state (autocast
    # casts the conv and the projections; the backward runs outside it).
    device = inputs[0].device.type
    ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))


def _backward(ctx, dy: Tensor):
    saved = ctx.saved_tensors
    wanted = [i for i in range(_N_TENSORS) if ctx.needs_input_grad[i]]
    grads: list[Tensor | None] = [None] * (_N_TENSORS + 3)
    if not wanted:
        return tuple(grads)
    device, autocast, autocast_dtype = ctx.autocast
    xz, *weights = saved
    d_inner = weights[-2].shape[0]  # A_log
    with torch.enable_grad():
        # The halves of xz as leaves of their own: their gradients are then joined by one cat,
        # where autograd through the slicing would zero and fill an xz-sized gradient per half.
        halves = [h.detach().requires_grad_(0 in wanted) for h in (xz[:, :d_inner], xz[:, d_inner:])]
        weights = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(weights, 1)]
        # The forward as it ran; its gradient as plain autograd would take it (outside autocast).
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
            y = halves_path(*halves, *weights, ctx.order, ctx.n_slices, ctx.backend)
        targets = (halves if 0 in wanted else []) + [weights[i - 1] for i in wanted if i > 0]
        found = list(torch.autograd.grad(y, targets, dy))
    if 0 in wanted:
        found[:2] = [torch.cat(found[:2], dim=1)]
    for i, g in zip(wanted, found):
        grads[i] = g
    return tuple(grads)


_ssm_direction.register_autograd(_backward, setup_context=_setup_context)


def ssm_direction(
    xz: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor,
    x_proj_weight: Tensor,
    dt_proj_weight: Tensor,
    dt_proj_bias: Tensor,
    A_log: Tensor,
    D: Tensor,
    order: str,
    n_slices: int,
    backend: str = "auto",
) -> Tensor:
    """:func:`direction_path` with its intermediates recomputed in the backward (same arguments)."""
    return _ssm_direction(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
                          order, n_slices, backend)
