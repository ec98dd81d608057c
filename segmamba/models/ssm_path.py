"""One direction of the Mamba inner path, with recomputation in the backward.

Per direction: causal depthwise conv (SiLU) -> x_proj -> dt_proj -> selective scan gated
by z, in that direction's token order. :func:`direction_path` is the plain composition;
:func:`ssm_direction` runs it as one custom op that keeps only its input ``xz`` (shared by
all three directions) and the weights for the backward, and recomputes the conv output,
the projections and the scan there. Activation memory per direction is therefore nothing
beyond the shared ``xz``, instead of about six (batch, d_inner, L) tensors.

The op is a ``torch.library`` custom op rather than an autograd.Function because the
backward needs ``torch.autograd.grad`` through the kernels, which dynamo does not trace in
an autograd.Function (a graph break) but AOTAutograd does trace in a custom op's
registered backward, so ``torch.compile(model, fullgraph=True)`` works on every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from segmamba_kernels import causal_conv1d, selective_scan

from .orders import from_order, to_order


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
    Returns (batch, d_inner, L) in flattened token order, in xz's dtype. The projections run
    in xz's dtype whatever the autocast state, so a recomputation matches the forward.
    """
    d_inner, n_state = A_log.shape
    dt_rank = dt_proj_weight.shape[1]
    # The scan's own parameters stay in its compute dtype (float32, float64 for float64 input).
    scan_dtype = torch.float64 if xz.dtype == torch.float64 else torch.float32
    x, z = to_order(xz, order, n_slices).split(d_inner, dim=1)
    xc = causal_conv1d(x, conv_weight, conv_bias, activation="silu", backend=backend)
    dt_low, B, C = torch.matmul(x_proj_weight.to(xc.dtype), xc).split([dt_rank, n_state, n_state], dim=1)
    dt = torch.matmul(dt_proj_weight.to(xc.dtype), dt_low)
    y = selective_scan(xc, dt, -torch.exp(A_log.to(scan_dtype)), B, C, D.to(scan_dtype), z=z,
                       delta_bias=dt_proj_bias.to(scan_dtype), delta_softplus=True, backend=backend)
    return from_order(y, order, n_slices)


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


def _backward(ctx, dy: Tensor):
    saved = ctx.saved_tensors
    wanted = [i for i in range(_N_TENSORS) if ctx.needs_input_grad[i]]
    grads: list[Tensor | None] = [None] * (_N_TENSORS + 3)
    if not wanted:
        return tuple(grads)
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(saved)]
        y = direction_path(*inputs, ctx.order, ctx.n_slices, ctx.backend)
        for i, g in zip(wanted, torch.autograd.grad(y, [inputs[i] for i in wanted], dy)):
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
