"""Pieces shared by the Triton scan and conv kernels: interpreter detection,
config pruning, and elementwise math that must agree between the two."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Read once, at import: triton decides at decoration time whether kernels run
# compiled or under the interpreter, so a later change of the variable would not
# change how the already-decorated kernels run either.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def config(num_warps: int, **block: int) -> triton.Config:
    # num_stages=1: no software pipelining of the loads in the L / N loops, which
    # leaves shared memory to the scans' cross-warp step. Untested on a GPU whether
    # prefetching the next B/C rows would pay; a candidate for the config set.
    return triton.Config(dict(block), num_warps=num_warps, num_stages=1)


def first_only_under_interpreter(configs: list[triton.Config]) -> list[triton.Config]:
    """Autotuning benchmarks every config; under the interpreter that would multiply
    the (slow) run time, so there exactly one config survives."""
    return configs[:1] if INTERPRET else configs


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
