"""Causal depthwise conv1d (width 2..4, optional SiLU), forward and backward, in Triton.

One program per (block of BLOCK_L steps, block of BLOCK_D channels, batch); the
W - 1 step halo before the block is read again from memory (an L1/L2 hit), so
every element of x is fetched from DRAM about once. Step blocks are on grid axis 0
(up to 2^31 - 1 programs): on axis 2 (65535) a 256^3 volume did not launch.

Scan orders (docs/design.md §3): the causal window runs over scan steps, and step t
reads and writes memory position m(t) = T(R(t)), so inputs and outputs stay in memory
order. A tile holds ascending s = R(t), so the taps of a reverse conv are the
contiguous loads of the forward one shifted the other way (``step_back``); T
(inter-slice) gathers.

The backward needs dpre (the gradient before the activation) at t .. t + W - 1
for dx[t] = sum_k w[k] dpre[t + W - 1 - k]; rather than writing dpre out and
reading it back, each program recomputes the pre-activation at the W shifts it
needs (W^2 <= 16 FMAs per element, cheap next to the memory traffic).
dweight and dbias sum over batch and L: each program reduces its tile and stores
its [BLOCK_D, W + 1] partial in its own slot; the slots are summed afterwards in
a fixed order. That is deterministic whatever the schedule, so the backward has
no separate deterministic mode. The slot buffer is sized for the smallest step
block (256), zeroed and read back by the sum: about 2 * (W + 1) / 256 = 4 % of
the bytes of x at W = 4, next to the 4 tensors of x's size the backward moves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (INTERPRET, as_i64, checked_grid, config, configs_to_try, launch,
                      order_constexprs, silu_and_grad, slice_position, step_back)

if INTERPRET:
    CONFIGS = [config(1, BLOCK_D=2, BLOCK_L=16)]
else:
    # ptxas's own register target (no maxnreg) is kept where it never spilled; the 8-warp
    # config was BLOCK_D 4 x BLOCK_L 512 and spilled (1 STL) in one bf16 variant on sm_90 at
    # the 128 registers two resident blocks allow. Half the tile with an explicit bound of 128
    # keeps two blocks per SM and spills in no variant (benchmarks/TRITON_RESOURCES.md).
    CONFIGS = [
        config(4, BLOCK_D=1, BLOCK_L=1024),
        config(4, BLOCK_D=4, BLOCK_L=256),
        config(8, 128, BLOCK_D=2, BLOCK_L=512),
    ]
MIN_BLOCK_L = min(c.kwargs["BLOCK_L"] for c in CONFIGS)
# Everything that changes the compiled program or its speed, except the tuned tile sizes.
KEY = ["dim", "L", "slices", "W", "SILU", "REVERSE", "SLICED"]


def _prune(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    smallest = min(c.kwargs["BLOCK_L"] for c in configs)
    limit = max(triton.next_power_of_2(named_args["L"]), smallest)
    return configs_to_try([c for c in configs if c.kwargs["BLOCK_L"] <= limit], named_args)


def grid(batch: int, dim: int, L: int, BLOCK_D: int, BLOCK_L: int) -> tuple[int, int, int]:
    """(step blocks, channel blocks, batch): the one axis that grows with the volume is axis 0."""
    return checked_grid((triton.cdiv(L, BLOCK_L), triton.cdiv(dim, BLOCK_D), batch))


@triton.jit
def _tap(x_ptr, rows, s, L, slices, SLICED: tl.constexpr):
    """x[:, T(s)] as a [BLOCK_D, BLOCK_L] tile, zero for s outside [0, L)."""
    ok = (s >= 0) & (s < L)
    pos = slice_position(s, L, slices, SLICED)
    return tl.load(x_ptr + rows[:, None] + pos[None, :], mask=ok[None, :], other=0.0)


@triton.jit
def _pre_activation(x_ptr, rows, s, L, slices, w_ptr, d, bias, W: tl.constexpr, REVERSE: tl.constexpr,
                    SLICED: tl.constexpr):
    """bias + sum_k w[:, k] * x[:, (step W - 1 - k before s)], steps before the first being zero."""
    acc = tl.zeros([bias.shape[0], s.shape[0]], dtype=bias.dtype) + bias[:, None]
    for k in tl.static_range(W):
        xk = _tap(x_ptr, rows, step_back(s, W - 1 - k, REVERSE), L, slices, SLICED)
        acc += tl.load(w_ptr + d * W + k)[:, None] * xk.to(bias.dtype)
    return acc


@triton.autotune(configs=CONFIGS, key=KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, dim, L, slices,
                     W: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr, SLICED: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    s = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    pid_b = as_i64(tl.program_id(2))
    d_ok = d < dim
    d = tl.where(d_ok, d, 0)  # clamp: padded channels recompute channel 0 and are not stored
    rows = (pid_b * dim + d) * L
    bias = tl.load(bias_ptr + d)
    out = _pre_activation(x_ptr, rows, s, L, slices, w_ptr, d, bias, W, REVERSE, SLICED)
    if SILU:
        out = silu_and_grad(out)[0]
    pos = slice_position(s, L, slices, SLICED)
    tl.store(out_ptr + rows[:, None] + pos[None, :], out.to(out_ptr.dtype.element_ty),
             mask=d_ok[:, None] & (s < L)[None, :])


@triton.autotune(configs=CONFIGS, key=KEY, prune_configs_by={"early_config_prune": _prune},
                 reset_to_zero=["part_ptr"])
@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, dout_ptr, dx_ptr, part_ptr, dim, L, slices,
                     W: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr, SLICED: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_l = tl.program_id(0)
    s = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    pid_b = as_i64(tl.program_id(2))
    d_ok = d < dim
    d = tl.where(d_ok, d, 0)
    rows = (pid_b * dim + d) * L
    # This program's slot of the (batch, step block, dim, W + 1) partial sums.
    part = ((pid_b * tl.num_programs(0) + pid_l) * dim + d) * (W + 1)
    bias = tl.load(bias_ptr + d)
    dx = tl.zeros([BLOCK_D, BLOCK_L], dtype=bias.dtype)
    for j in tl.static_range(W):
        # dpre j steps after s, which weight W - 1 - j carries back to x at s.
        sj = step_back(s, -j, REVERSE)
        g = _tap(dout_ptr, rows, sj, L, slices, SLICED).to(bias.dtype)
        if SILU:
            g = g * silu_and_grad(_pre_activation(x_ptr, rows, sj, L, slices, w_ptr, d, bias, W, REVERSE,
                                                  SLICED))[1]
        g = tl.where(d_ok[:, None], g, 0.0)
        dx += tl.load(w_ptr + d * W + (W - 1 - j))[:, None] * g
        if j == 0:
            tl.store(part_ptr + part + W, tl.sum(g, axis=1), mask=d_ok)
            for k in tl.static_range(W):
                xk = _tap(x_ptr, rows, step_back(s, W - 1 - k, REVERSE), L, slices, SLICED)
                tl.store(part_ptr + part + k, tl.sum(g * xk.to(bias.dtype), axis=1), mask=d_ok)
    pos = slice_position(s, L, slices, SLICED)
    tl.store(dx_ptr + rows[:, None] + pos[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=d_ok[:, None] & (s < L)[None, :])


def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor, silu: bool, *, reverse: bool = False,
                      slices: int = 1) -> Tensor:
    batch, dim, L = x.shape
    order = order_constexprs(L, reverse, slices)
    out = torch.empty_like(x)
    launch(_conv_fwd_kernel, lambda meta: grid(batch, dim, L, meta["BLOCK_D"], meta["BLOCK_L"]), x.device,
           x, weight, bias, out, dim, L, slices, W=weight.shape[1], SILU=bool(silu), **order)
    return out


def causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Tensor, silu: bool, dout: Tensor, *, reverse: bool = False,
                      slices: int = 1, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``deterministic`` is accepted for the backend contract: this backward always is."""
    batch, dim, L = x.shape
    order = order_constexprs(L, reverse, slices)
    width = weight.shape[1]
    dx = torch.empty_like(x)
    # Slots for the smallest step block any config may pick; a config with larger blocks
    # leaves the rest zero (the autotuner re-zeroes the buffer between its trial runs).
    part = torch.zeros((batch, triton.cdiv(L, MIN_BLOCK_L), dim, width + 1), dtype=weight.dtype, device=x.device)
    launch(_conv_bwd_kernel, lambda meta: grid(batch, dim, L, meta["BLOCK_D"], meta["BLOCK_L"]), x.device,
           x, weight, bias, dout, dx, part, dim, L, slices, W=width, SILU=bool(silu), **order)
    # A fixed reduction over (batch, step block): the same order every run.
    total = part.sum((0, 1))
    return dx, total[:, :width].contiguous(), total[:, width].contiguous()
