"""Order-independent, exact accumulation of float contributions in two-word fixed point.

Float atomics add in whatever order the programs reach memory, so their last bits vary
from run to run. Integer addition is associative: if every contribution is first rounded
to a fixed-point integer (a deterministic function of the contribution alone), the sum is
the same integer in any order, and so is its one final conversion to float.

Format: a contribution x is X = sign(x) * trunc(|x| * 2^68), split as X = hi * 2^48 + lo
with hi = sign(x) * floor(|x| * 2^20) and |lo| < 2^48 of the same sign; the two words are
summed separately by plain integer atomics (no carry, so no atomic has to return its old
value: that round trip would stall the latency-bound scan). The accumulator is two int64
planes; the host folds the low words' excess into the high word, exactly, before one
rounding to float.
    resolution  2^-68 ~ 3.4e-21: each contribution is truncated toward zero to a multiple
                of it (absolute error of a sum of `count` contributions below count * 3.4e-21);
    range       up to count <= 2^15 contributions per element (the low words' sum stays
                within +-2^63); each |x| < 2^43 / count (so that the high words' sum stays below
                2^63): 9.2e10 at 96 adders, 1.1e10 at 768. A contribution outside that range
                (or NaN / inf) is reported by the kernel (a running max of |x| per program,
                checked once at its end), and the result then reads NaN (as a float overflow
                would show, e.g. to a GradScaler) instead of a wrapped sum.
The adds are unmasked (a masked 64-bit atomic is a branch per element): callers add exact
zeros where there is nothing to add, at addresses inside the buffer, which is padded by
``pad`` elements before and after for that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

FRAC_BITS = 68
LO_BITS = 48
MAX_COUNT = 2**15  # low words: MAX_COUNT * 2^LO_BITS <= 2^63
RANGE_BITS = 63 + LO_BITS - FRAC_BITS  # high words: count * |x| < 2^RANGE_BITS


def check_count(count: int, what: str) -> None:
    if count > MAX_COUNT:
        raise ValueError(f"{what}: deterministic accumulation takes at most {MAX_COUNT} contributions per "
                         f"element, got {count}")


def new_accumulator(numel: int, pad: int, device: torch.device) -> Tensor:
    """Zeroed accumulator for ``numel`` elements, int64: [pad | low words | high words | pad].
    The kernels address it from element ``pad`` with the high words ``numel`` further on."""
    return torch.zeros(2 * numel + 2 * pad, dtype=torch.int64, device=device)


def new_overflow_flag(device: torch.device) -> Tensor:
    """Zeroed overflow flag, (1,) int32; one flag may serve several accumulators."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def accumulator_value(acc: Tensor, pad: int, shape: tuple[int, ...], overflow: Tensor, dtype: torch.dtype) -> Tensor:
    """The accumulated sums as ``dtype`` in ``shape``: rounded once from the exact integers (so the
    bits depend on nothing but the set of contributions); NaN everywhere after an out-of-range
    contribution."""
    lo, hi = acc[pad:acc.numel() - pad].view(2, *shape)
    # Exact integer normalisation: lo = carry * 2^48 + rest with 0 <= rest < 2^48 (the shift is
    # arithmetic, so this holds for negative lo too); then both words convert to float64 exactly
    # (hi while |sum| < 2^33) and the one addition rounds once.
    hi = hi + (lo >> LO_BITS)
    lo = lo & (2**LO_BITS - 1)
    value = hi.double() * 2.0 ** (LO_BITS - FRAC_BITS) + lo.double() * 2.0**-FRAC_BITS
    return torch.where(overflow.bool(), float("nan"), value).to(dtype)


@triton.jit
def exact_add(acc_ptr, plane, offs, x, amax):
    """acc[offs] += x, exactly (unmasked); ``plane`` is the offset of the high words. Returns
    ``amax`` updated with |x| (NaN sticks), for ``exact_check``."""
    # Truncation splits a = x * 2^(FRAC_BITS - LO_BITS) (exact scaling) into the integer part hi
    # and the fraction a - hi, which is exact (same sign, below 1) while |a| < 2^24 (2^53 in
    # float64) and 0 above, where a is an integer; hi converts back exactly in both cases.
    a = x * 1048576.0
    hi = a.to(tl.int64)
    lo = ((a - hi.to(a.dtype)) * 281474976710656.0).to(tl.int64)  # * 2^48, truncated below 2^-68
    tl.atomic_add(acc_ptr + offs, lo, sem="relaxed")
    tl.atomic_add(acc_ptr + plane + offs, hi, sem="relaxed")
    return tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def exact_check(overflow_ptr, amax, count):
    """Raise the overflow flag if any |x| added (``amax``, a 1-D running max) was out of range
    or NaN (mapped to inf first: the max reduction drops NaN)."""
    worst = tl.max(tl.where(amax == amax, amax, float("inf")), axis=0)
    tl.store(overflow_ptr, 1, mask=(worst < 8796093022208.0 / count) == 0)  # 2^RANGE_BITS / count
