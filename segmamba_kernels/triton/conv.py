"""Causal depthwise conv1d (width 2..4, optional SiLU), forward and backward, in Triton.

One program per (batch, block of BLOCK_D channels, block of BLOCK_L steps); the
W - 1 step halo before the block is read again from memory (an L1/L2 hit), so
every element of x is fetched from DRAM about once.

The backward needs dpre (the gradient before the activation) at t .. t + W - 1
for dx[t] = sum_k w[k] dpre[t + W - 1 - k]; rather than writing dpre out and
reading it back, each program recomputes the pre-activation at the W shifts it
needs (W^2 <= 16 FMAs per element, cheap next to the memory traffic).
dweight and dbias sum over batch and L: each program reduces its tile and adds
the [BLOCK_D] result with a relaxed atomic (a few atomics per program; the
order of fp32 additions, hence the last bits, can vary run to run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, config, first_only_under_interpreter, silu_and_grad

if INTERPRET:
    CONFIGS = [config(1, BLOCK_D=2, BLOCK_L=16)]
else:
    CONFIGS = [
        config(4, BLOCK_D=1, BLOCK_L=1024),
        config(4, BLOCK_D=4, BLOCK_L=256),
        config(8, BLOCK_D=4, BLOCK_L=512),
    ]


def _prune(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    smallest = min(c.kwargs["BLOCK_L"] for c in configs)
    limit = max(triton.next_power_of_2(named_args["L"]), smallest)
    return first_only_under_interpreter([c for c in configs if c.kwargs["BLOCK_L"] <= limit])


@triton.jit
def _pre_activation(x_ptr, rows, t, L, w_ptr, d, bias, W: tl.constexpr):
    """bias + sum_k w[:, k] * x[:, t - (W - 1) + k], zero outside 0 <= t < L."""
    acc = tl.zeros([bias.shape[0], t.shape[0]], dtype=bias.dtype) + bias[:, None]
    for k in tl.static_range(W):
        src = t - (W - 1) + k
        xk = tl.load(x_ptr + rows[:, None] + src[None, :], mask=((src >= 0) & (src < L))[None, :], other=0.0)
        acc += tl.load(w_ptr + d * W + k)[:, None] * xk.to(bias.dtype)
    return acc


@triton.autotune(configs=CONFIGS, key=["dim", "L"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, dim, L,
                     W: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    d_ok = d < dim
    d = tl.where(d_ok, d, 0)  # clamp: padded channels recompute channel 0 and are not stored
    rows = (pid_b * dim + d) * L
    bias = tl.load(bias_ptr + d)
    out = _pre_activation(x_ptr, rows, t, L, w_ptr, d, bias, W)
    if SILU:
        out = silu_and_grad(out)[0]
    tl.store(out_ptr + rows[:, None] + t[None, :], out.to(out_ptr.dtype.element_ty),
             mask=d_ok[:, None] & (t < L)[None, :])


@triton.autotune(configs=CONFIGS, key=["dim", "L"], prune_configs_by={"early_config_prune": _prune},
                 reset_to_zero=["dw_ptr", "dbias_ptr"])
@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr, dim, L,
                     W: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    d_ok = d < dim
    d = tl.where(d_ok, d, 0)
    rows = (pid_b * dim + d) * L
    bias = tl.load(bias_ptr + d)
    dx = tl.zeros([BLOCK_D, BLOCK_L], dtype=bias.dtype)
    for s in tl.static_range(W):
        # dpre at t + s, which weight W - 1 - s carries back to x[t].
        ts = t + s
        ts_ok = (ts < L)[None, :]
        g = tl.load(dout_ptr + rows[:, None] + ts[None, :], mask=ts_ok, other=0.0).to(bias.dtype)
        if SILU:
            g = g * silu_and_grad(_pre_activation(x_ptr, rows, ts, L, w_ptr, d, bias, W))[1]
        g = tl.where(d_ok[:, None], g, 0.0)
        dx += tl.load(w_ptr + d * W + (W - 1 - s))[:, None] * g
        if s == 0:
            tl.atomic_add(dbias_ptr + d, tl.sum(g, axis=1), mask=d_ok, sem="relaxed")
            for k in tl.static_range(W):
                src = t - (W - 1) + k
                xk = tl.load(x_ptr + rows[:, None] + src[None, :], mask=((src >= 0) & (src < L))[None, :], other=0.0)
                tl.atomic_add(dw_ptr + d * W + k, tl.sum(g * xk.to(bias.dtype), axis=1), mask=d_ok, sem="relaxed")
    tl.store(dx_ptr + rows[:, None] + t[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=d_ok[:, None] & (t < L)[None, :])


def _grid(x: Tensor):
    batch, dim, L = x.shape
    return lambda meta: (batch, triton.cdiv(dim, meta["BLOCK_D"]), triton.cdiv(L, meta["BLOCK_L"]))


def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor, silu: bool) -> Tensor:
    out = torch.empty_like(x)
    _conv_fwd_kernel[_grid(x)](x, weight, bias, out, x.shape[1], x.shape[2], W=weight.shape[1], SILU=bool(silu))
    return out


def causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Tensor, silu: bool,
                      dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx = torch.empty_like(x)
    dweight = torch.zeros_like(weight)
    dbias = torch.zeros_like(bias)
    _conv_bwd_kernel[_grid(x)](x, weight, bias, dout, dx, dweight, dbias, x.shape[1], x.shape[2],
                               W=weight.shape[1], SILU=bool(silu))
    return dx, dweight, dbias
