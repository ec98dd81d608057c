"""The public ops: argument checks, backend choice, and torch.library registration.

Compiled and Triton backends run inside `segmamba::*` custom ops with fake
kernels and autograd formulas, so torch.compile traces through them without
graph breaks. The reference backend is plain PyTorch and is traced directly.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import check_causal_conv1d_args, check_selective_scan_args
from .dispatch import get_backend, resolve_backend, scan_chunk_states_stride
from .reference import causal_conv1d_ref, selective_scan_ref


def _compute_dtype(io_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if io_dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- selective scan

@torch.library.custom_op("segmamba::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Optional[Tensor],
              delta_bias: Tensor, delta_softplus: bool, save_states: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    mod = get_backend(backend)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if scan_chunk_states_stride(backend):
        return tuple(mod.selective_scan_fwd(*args, save_states))
    out, last_state = mod.selective_scan_fwd(*args)
    return out, last_state, A.new_empty(0)


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_states, backend):
    batch, dim, L = u.shape
    stride = scan_chunk_states_stride(backend)
    states_shape = (batch, (L + stride - 1) // stride, A.shape[1], dim) if stride and save_states else (0,)
    return torch.empty_like(u), u.new_empty((batch, dim, A.shape[1]), dtype=A.dtype), A.new_empty(states_shape)


@torch.library.custom_op("segmamba::selective_scan_bwd", mutates_args=())
def _scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Optional[Tensor],
              delta_bias: Tensor, delta_softplus: bool, dout: Tensor, chunk_states: Tensor,
              backend: str) -> list[Tensor]:
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout)
    if scan_chunk_states_stride(backend):
        args += (chunk_states,)
    return list(get_backend(backend).selective_scan_bwd(*args))


@_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout, chunk_states, backend):
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    return [torch.empty_like(t) for t in (u, delta, A, B, C, D)] + [dz, torch.empty_like(delta_bias)]


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_states, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus, ctx.backend = delta_softplus, backend
    # Like mamba_ssm, the final state is an output for chaining inference, not a differentiable one.
    ctx.mark_non_differentiable(output[1], output[2])
    # Otherwise autograd would fill a zero "gradient" as large as the chunk states before every
    # backward (6 MB at L = 32^3).
    ctx.set_materialize_grads(False)


def _scan_backward(ctx, dout, _dlast_state, _dchunk_states):
    if dout is None:  # no gradient reached `out`: every input's gradient is zero
        return (None,) * 11
    u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = _scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, dout.contiguous(), chunk_states, ctx.backend)
    return du, ddelta, dA, dB, dC, dD, (dz if z is not None else None), ddelta_bias, None, None, None


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
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba selective scan (mamba_ssm's ``selective_scan_fn`` contract).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, groups, N, L);
    D, delta_bias: (dim,). Returns ``out`` (batch, dim, L) in u's dtype and, with
    ``return_last_state``, the final state (batch, dim, N) in float32 (float64 for float64 inputs),
    which is not differentiable. delta, B, C and z are computed in u's dtype (cast if they differ);
    the state and all arithmetic are float32 (float64 for float64 inputs).
    ``backend``: "auto", "reference", "cpu", "cuda" or "triton" (see docs/design.md §3).
    """
    check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device)
    if name == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    io, cdt = u.dtype, _compute_dtype(u.dtype)
    dim = u.shape[1]
    # The backward needs the forward's saved states only when there will be a backward.
    save_states = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    out, last_state, _ = _scan_fwd(
        u.contiguous(),
        delta.to(io).contiguous(),
        A.to(cdt).contiguous(),
        B4.to(io).contiguous(),
        C4.to(io).contiguous(),
        D.to(cdt).contiguous() if D is not None else u.new_zeros(dim, dtype=cdt),
        z.to(io).contiguous() if z is not None else None,
        delta_bias.to(cdt).contiguous() if delta_bias is not None else u.new_zeros(dim, dtype=cdt),
        bool(delta_softplus),
        save_states,
        name,
    )
    return (out, last_state) if return_last_state else out


# --------------------------------------------------------------------------- causal conv1d

@torch.library.custom_op("segmamba::causal_conv1d_fwd", mutates_args=())
def _conv_fwd(x: Tensor, weight: Tensor, bias: Tensor, silu: bool, backend: str) -> Tensor:
    return get_backend(backend).causal_conv1d_fwd(x, weight, bias, silu)


@_conv_fwd.register_fake
def _(x, weight, bias, silu, backend):
    return torch.empty_like(x)


@torch.library.custom_op("segmamba::causal_conv1d_bwd", mutates_args=())
def _conv_bwd(x: Tensor, weight: Tensor, bias: Tensor, silu: bool, dout: Tensor, backend: str) -> list[Tensor]:
    return list(get_backend(backend).causal_conv1d_bwd(x, weight, bias, silu, dout))


@_conv_bwd.register_fake
def _(x, weight, bias, silu, dout, backend):
    return [torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)]


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, silu, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu, ctx.backend = silu, backend


def _conv_backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _conv_bwd(x, weight, bias, ctx.silu, dout.contiguous(), ctx.backend)
    return dx, dweight, dbias, None, None


_conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Causal depthwise conv1d (causal_conv1d's ``causal_conv1d_fn`` contract).

    x: (batch, dim, L); weight: (dim, width) with width in 2..4; bias: (dim,);
    activation: None, "silu" or "swish". Zeros are assumed before t = 0.
    Returns (batch, dim, L) in x's dtype; weight and bias are used in float32
    (float64 for float64 inputs).
    """
    check_causal_conv1d_args(x, weight, bias, activation)
    name = resolve_backend(backend, x.device)
    if name == "reference":
        return causal_conv1d_ref(x, weight, bias, activation)
    cdt = _compute_dtype(x.dtype)
    return _conv_fwd(
        x.contiguous(),
        weight.to(cdt).contiguous(),
        bias.to(cdt).contiguous() if bias is not None else x.new_zeros(x.shape[1], dtype=cdt),
        activation is not None,
        name,
    )
