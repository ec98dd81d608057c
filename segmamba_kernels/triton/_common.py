"""Pieces shared by the Triton scan and conv kernels: interpreter detection, config
pruning, the guarded launch, scan-order and 64-bit offset arithmetic, and elementwise
math that must agree between the two."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch
import triton
import triton.language as tl

# Read once, at import: triton decides at decoration time whether kernels run
# compiled or under the interpreter, so a later change of the variable would not
# change how the already-decorated kernels run either.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest grid extents (CUDA): axis 0 up to 2^31 - 1 blocks, axes 1 and 2 up to 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def config(num_warps: int, maxnreg: int | None = None, **block: int) -> triton.Config:
    # num_stages=1: no software pipelining of the loads in the L / N loops, which
    # leaves shared memory to the scans' cross-warp step. Untested on a GPU whether
    # prefetching the next B/C rows would pay; a candidate for the config set.
    return triton.Config(dict(block), num_warps=num_warps, num_stages=1, maxnreg=maxnreg)


AUTOTUNE_ENV = "SEGMAMBA_TRITON_AUTOTUNE"


def configs_to_try(configs: list[triton.Config], named_args: dict) -> list[triton.Config]:
    """The configs autotuning compiles and times for one launch. Each costs a cold compile
    (seconds) per specialisation, so only the first survives where speed does not matter:
    under the interpreter (where running one is slow enough), for float64 (a correctness
    dtype), and when ``SEGMAMBA_TRITON_AUTOTUNE=0`` (tests on a GPU: benchmarks/gpu_check.sh)."""
    flag = os.environ.get(AUTOTUNE_ENV, "1")
    if flag not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV}: expected 0 or 1, got {flag!r}")
    fp64 = any(getattr(v, "dtype", None) == torch.float64 for v in named_args.values())
    return configs[:1] if INTERPRET or fp64 or flag == "0" else configs


# --------------------------------------------------------------------------- launching

def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for a launch: triton launches on the current CUDA device
    and stream, which need not be the inputs' device (a model on cuda:1 in a process whose
    current device is 0). A no-op for CPU tensors (interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def checked_grid(grid: tuple[int, ...]) -> tuple[int, ...]:
    """``grid``, or a clear error where an axis exceeds what CUDA launches (rather than a launch
    failure deep inside triton)."""
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"launch grid {grid}: axis {axis} has {n} programs, CUDA allows at most {limit}")
    return grid


# When a list, launches are appended to it instead of run (``aot`` compiles exactly what the
# host code would launch, from meta tensors, without a GPU).
_recorded_launches: list[tuple[Any, Callable, tuple, dict]] | None = None


def launch(kernel: Any, grid: Callable, device: torch.device, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` with ``device`` current (or recorded, see below)."""
    if _recorded_launches is not None:
        _recorded_launches.append((kernel, grid, args, kwargs))
        return
    with device_guard(device):
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording_launches():
    """Within the block, ``launch`` records (kernel, grid, args, kwargs) instead of launching."""
    global _recorded_launches
    outer, _recorded_launches = _recorded_launches, []
    try:
        yield _recorded_launches
    finally:
        _recorded_launches = outer


# --------------------------------------------------------------------------- offsets and orders

@triton.jit
def as_i64(x):
    """``x`` as int64, whether a runtime scalar, a tensor or a constexpr (triton turns an
    int argument equal to 1 into a constexpr). Offsets are int64 before any product that
    can pass 2^31 (the scan's B/C row n * L does from (N - 1) * L = 2^31 on)."""
    return x + tl.zeros([], dtype=tl.int64)


def order_constexprs(L: int, reverse: bool, slices: int) -> dict[str, bool]:
    """The kernels' REVERSE / SLICED constexprs for a scan order (docs/design.md §3)."""
    if slices < 1 or L % slices:
        raise ValueError(f"slices: expected a positive divisor of L = {L}, got {slices}")
    return dict(REVERSE=bool(reverse), SLICED=slices > 1)


# Scan orders (docs/design.md §3): step t touches memory position m(t) = T(R(t)). The kernels
# tile the *reversed* index s = R(t) in ascending order, so a REVERSE tile is contiguous in memory
# (the same loads as the forward order) and its steps run from the tile's end to its start: the
# scans over a tile flip direction instead of the data. T (inter-slice) is then a gather.

@triton.jit
def tile_start(c, L, BLOCK_L: tl.constexpr, REVERSE: tl.constexpr):
    """First index s of the tile holding scan steps [c * BLOCK_L, (c + 1) * BLOCK_L); negative
    for the last, partial chunk of a reverse scan (those s are masked)."""
    return L - (c + 1) * BLOCK_L if REVERSE else c * BLOCK_L


@triton.jit
def step_back(s, j, REVERSE: tl.constexpr):
    """The index s of the step j steps earlier in scan order than the step at s."""
    return s + j if REVERSE else s - j


@triton.jit
def slice_position(s, L, slices, SLICED: tl.constexpr):
    """T(s) = (s % S) * (L / S) + s // S (S = slices, a divisor of L) when SLICED, else s.
    Both terms stay below L, so int32 suffices whenever L does. s outside [0, L) belongs to
    no step: masked loads and stores skip it, and unmasked adds of zeros need an address
    near the sequence, which s itself is (within a chunk of either end) and which T would
    not be for s < 0 (C remainder): there s is clamped first."""
    if SLICED:
        s = tl.minimum(tl.maximum(s, 0), L - 1)
        return (s % slices) * (L // slices) + s // slices
    return s


# --------------------------------------------------------------------------- elementwise math

@triton.jit
def softplus(x):
    """log(1 + exp(x)) without overflow and with log1p accuracy for x << 0.

    There is no log1p in triton.language (libdevice's is not available under the
    interpreter), so log1p(e) uses the classic e * log(w) / (w - 1), w = 1 + e,
    which is accurate to a few ulp because the rounding error of w cancels.
    """
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    wm1 = w - 1.0
    log1p_e = tl.where(wm1 == 0.0, e, tl.log(w) * (e / tl.where(wm1 == 0.0, 1.0, wm1)))
    return tl.where(x > 20.0, x, log1p_e)


@triton.jit
def softplus_grad(x):
    """Derivative of ``softplus`` as computed (the identity above 20, as in PyTorch)."""
    return tl.where(x > 20.0, 1.0, tl.sigmoid(x))


@triton.jit
def silu_and_grad(z):
    """(silu(z), d silu / dz)."""
    s = tl.sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s))
