"""The public ops: argument checks, backend choice, and torch.library registration.

Compiled and Triton backends run inside `segmamba::*` custom ops with fake
kernels and autograd formulas, so torch.compile traces through them without
graph breaks. The reference backend is plain PyTorch and is traced directly.
Both ops take a scan order (docs/design.md §3), handed to the backends as
`reverse` / `slices`; whether the backward must be deterministic is decided at
forward time and handed to the backward custom op as an argument.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import check_causal_conv1d_args, check_order, check_selective_scan_args
from .dispatch import accepts_batch_strides, deterministic_mode, get_backend, resolve_backend, scan_chunk_states_stride
from .orders import backend_order
from .reference import causal_conv1d_ref, selective_scan_ref


def _compute_dtype(io_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if io_dtype == torch.float64 else torch.float32


def _rows(t: Tensor, batch_strided: bool) -> Tensor:
    """A (batch, ..., L) input as the backend reads it: contiguous, or, for a backend that takes any
    batch stride, with each batch element contiguous (a slice of a larger tensor, as the halves of
    the Mamba layer's in_proj output, is then passed without a copy)."""
    if batch_strided and t.shape[0] > 0 and t[0].is_contiguous():
        return t
    return t.contiguous()


# --------------------------------------------------------------------------- selective scan

@torch.library.custom_op("segmamba::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Optional[Tensor],
              delta_bias: Tensor, delta_softplus: bool, save_states: bool, reverse: bool, slices: int,
              deterministic: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    # `deterministic` is for the backward (see _scan_setup_context).
    mod = get_backend(backend)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if scan_chunk_states_stride(backend):
        return tuple(mod.selective_scan_fwd(*args, save_states, reverse=reverse, slices=slices))
    out, last_state = mod.selective_scan_fwd(*args, reverse=reverse, slices=slices)
    return out, last_state, A.new_empty(0)


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_states, reverse, slices, deterministic, backend):
    batch, dim, L = u.shape
    stride = scan_chunk_states_stride(backend)
    states_shape = (batch, (L + stride - 1) // stride, A.shape[1], dim) if stride and save_states else (0,)
    # Outputs are contiguous whatever the inputs' batch strides.
    return u.new_empty(u.shape), u.new_empty((batch, dim, A.shape[1]), dtype=A.dtype), A.new_empty(states_shape)


@torch.library.custom_op("segmamba::selective_scan_bwd", mutates_args=())
def _scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Optional[Tensor],
              delta_bias: Tensor, delta_softplus: bool, dout: Tensor, chunk_states: Tensor, reverse: bool,
              slices: int, deterministic: bool, backend: str) -> list[Tensor]:
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout)
    if scan_chunk_states_stride(backend):
        args += (chunk_states,)
    return list(get_backend(backend).selective_scan_bwd(*args, reverse=reverse, slices=slices,
                                                        deterministic=deterministic))


@_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout, chunk_states, reverse, slices, deterministic,
      backend):
    dz = z.new_empty(z.shape) if z is not None else u.new_empty(0)
    return [t.new_empty(t.shape) for t in (u, delta, A, B, C, D)] + [dz, delta_bias.new_empty(delta_bias.shape)]


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_states, reverse, slices, deterministic, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus, ctx.backend = delta_softplus, backend
    ctx.reverse, ctx.slices, ctx.deterministic = reverse, slices, deterministic
    # Like mamba_ssm, the final state is an output for chaining inference, not a differentiable one.
    ctx.mark_non_differentiable(output[1], output[2])
    # Otherwise autograd would fill a zero "gradient" as large as the chunk states before every
    # backward (6 MB at L = 32^3).
    ctx.set_materialize_grads(False)


def _scan_backward(ctx, dout, _dlast_state, _dchunk_states):
    if dout is None:  # no gradient reached `out`: every input's gradient is zero
        return (None,) * 14
    u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = _scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, _rows(dout, accepts_batch_strides(ctx.backend)),
        chunk_states, ctx.reverse,
        ctx.slices, ctx.deterministic, ctx.backend)
    return (du, ddelta, dA, dB, dC, dD, (dz if z is not None else None), ddelta_bias) + (None,) * 6


_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def selective_scan(
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
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba selective scan (mamba_ssm's ``selective_scan_fn`` contract).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, groups, N, L);
    D, delta_bias: (dim,). Returns ``out`` (batch, dim, L) in u's dtype and, with
    ``return_last_state``, the final state (batch, dim, N) in float32 (float64 for float64 inputs),
    which is not differentiable. delta, B, C and z are computed in u's dtype (cast if they differ);
    the state and all arithmetic are float32 (float64 for float64 inputs).
    ``order``: the order in which the recurrence walks the L tokens, "forward", "reverse" or
    "inter_slice" (the tokens as an (n_slices, L / n_slices) grid, walked column by column);
    inputs and outputs stay in token order, and ``last_state`` is the state after the last scan
    step. ``n_slices`` must divide L.
    ``backend``: "auto", "reference", "cpu", "cuda" or "triton" (see docs/design.md §3).
    """
    check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias)
    check_order(order, n_slices, u.shape[-1])
    name = resolve_backend(backend, u.device)
    if name == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  order=order, n_slices=n_slices)
    reverse, slices = backend_order(order, n_slices)
    io, cdt = u.dtype, _compute_dtype(u.dtype)
    dim = u.shape[1]
    # The backward needs the forward's saved states only when there will be a backward.
    save_states = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    strided = accepts_batch_strides(name)
    out, last_state, _ = _scan_fwd(
        _rows(u, strided),
        _rows(delta.to(io), strided),
        A.to(cdt).contiguous(),
        _rows(B4.to(io), strided),
        _rows(C4.to(io), strided),
        D.to(cdt).contiguous() if D is not None else u.new_zeros(dim, dtype=cdt),
        _rows(z.to(io), strided) if z is not None else None,
        delta_bias.to(cdt).contiguous() if delta_bias is not None else u.new_zeros(dim, dtype=cdt),
        bool(delta_softplus),
        save_states,
        reverse,
        slices,
        deterministic_mode(),
        name,
    )
    return (out, last_state) if return_last_state else out


# --------------------------------------------------------------------------- causal conv1d

@torch.library.custom_op("segmamba::causal_conv1d_fwd", mutates_args=())
def _conv_fwd(x: Tensor, weight: Tensor, bias: Tensor, silu: bool, reverse: bool, slices: int, deterministic: bool,
              backend: str) -> Tensor:
    # `deterministic` is for the backward (see _conv_setup_context).
    return get_backend(backend).causal_conv1d_fwd(x, weight, bias, silu, reverse=reverse, slices=slices)


@_conv_fwd.register_fake
def _(x, weight, bias, silu, reverse, slices, deterministic, backend):
    return x.new_empty(x.shape)  # contiguous whatever x's batch stride


@torch.library.custom_op("segmamba::causal_conv1d_bwd", mutates_args=())
def _conv_bwd(x: Tensor, weight: Tensor, bias: Tensor, silu: bool, dout: Tensor, reverse: bool, slices: int,
              deterministic: bool, backend: str) -> list[Tensor]:
    return list(get_backend(backend).causal_conv1d_bwd(x, weight, bias, silu, dout, reverse=reverse, slices=slices,
                                                       deterministic=deterministic))


@_conv_bwd.register_fake
def _(x, weight, bias, silu, dout, reverse, slices, deterministic, backend):
    return [t.new_empty(t.shape) for t in (x, weight, bias)]


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, silu, reverse, slices, deterministic, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu, ctx.reverse, ctx.slices, ctx.deterministic, ctx.backend = silu, reverse, slices, deterministic, backend


def _conv_backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _conv_bwd(x, weight, bias, ctx.silu, _rows(dout, accepts_batch_strides(ctx.backend)),
                                   ctx.reverse, ctx.slices, ctx.deterministic, ctx.backend)
    return (dx, dweight, dbias) + (None,) * 5


_conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    *,
    order: str = "forward",
    n_slices: int = 1,
    backend: str = "auto",
) -> Tensor:
    """Causal depthwise conv1d (causal_conv1d's ``causal_conv1d_fn`` contract).

    x: (batch, dim, L); weight: (dim, width) with width in 2..4; bias: (dim,);
    activation: None, "silu" or "swish". Zeros are assumed before t = 0.
    Returns (batch, dim, L) in x's dtype; weight and bias are used in float32
    (float64 for float64 inputs). ``order`` / ``n_slices``: the scan order whose steps t are
    the conv's time axis, as in :func:`selective_scan`; x and the output stay in token order.
    """
    check_causal_conv1d_args(x, weight, bias, activation)
    check_order(order, n_slices, x.shape[-1])
    name = resolve_backend(backend, x.device)
    if name == "reference":
        return causal_conv1d_ref(x, weight, bias, activation, order=order, n_slices=n_slices)
    reverse, slices = backend_order(order, n_slices)
    cdt = _compute_dtype(x.dtype)
    return _conv_fwd(
        _rows(x, accepts_batch_strides(name)),
        weight.to(cdt).contiguous(),
        bias.to(cdt).contiguous() if bias is not None else x.new_zeros(x.shape[1], dtype=cdt),
        activation is not None,
        reverse,
        slices,
        deterministic_mode(),
        name,
    )
