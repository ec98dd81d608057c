// Device helpers shared by the scan and conv kernels: loads and stores in scan order,
// activations, the affine-map warp and block scans, reductions, fixed-point sums.
#pragma once

#include <cstring>
#include <type_traits>

#include "device.cuh"

namespace segmamba_cuda {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr unsigned kFullMask = 0xffffffffu;

// The 16 bytes one thread loads or stores at once. may_alias: it reads and writes storage
// of T, which a plain uint4 lvalue may not under strict aliasing (GCC -O2 miscompiled that).
struct __attribute__((__may_alias__, __aligned__(16))) Vec16 {
    unsigned w[4];
};

// Where scan step t lives in memory (launch.h: scan order). pos() is the general rule;
// the item helpers below take the contiguous paths when the order allows.
struct ScanOrder {
    int len, slices, slice_len;
    bool reverse;

    __device__ __forceinline__ int pos(int t) const {
        const int s = reverse ? len - 1 - t : t;
        return slices == 1 ? s : (s % slices) * slice_len + s / slices;
    }
};

template <typename Params>
__device__ __forceinline__ ScanOrder order_of(const Params& p) {
    return {p.seqlen, p.slices, p.seqlen / p.slices, p.reverse};
}

// The kN scan steps t0 .. t0 + kN - 1 of a row, as Acc; steps at or beyond len read as 0.
// One 16-byte vector when vec_ok (16-byte aligned row, len % kN == 0), t0 % kN == 0, the
// steps are inside the row and contiguous in memory (one slice; reversed: a vector whose
// items come in the opposite order); otherwise one item at a time.
template <int kN, typename T, typename Acc>
__device__ __forceinline__ void load_items(const T* __restrict__ row, const ScanOrder& o, int t0, bool vec_ok,
                                           Acc (&out)[kN]) {
    static_assert(kN * sizeof(T) == 16, "one 16-byte vector per thread");
    if (vec_ok && o.slices == 1 && t0 + kN <= o.len) {
        const Vec16 raw = *reinterpret_cast<const Vec16*>(row + (o.reverse ? o.len - t0 - kN : t0));
        T v[kN];
        std::memcpy(v, &raw, 16);
        if (o.reverse) {
#pragma unroll
            for (int i = 0; i < kN; ++i) out[i] = static_cast<Acc>(v[kN - 1 - i]);
        } else {
#pragma unroll
            for (int i = 0; i < kN; ++i) out[i] = static_cast<Acc>(v[i]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < kN; ++i) out[i] = t0 + i < o.len ? static_cast<Acc>(row[o.pos(t0 + i)]) : Acc(0);
    }
}

template <int kN, typename T, typename Acc>
__device__ __forceinline__ void store_items(T* __restrict__ row, const ScanOrder& o, int t0, bool vec_ok,
                                            const Acc (&in)[kN]) {
    static_assert(kN * sizeof(T) == 16, "one 16-byte vector per thread");
    if (vec_ok && o.slices == 1 && t0 + kN <= o.len) {
        // Two loops, not in[o.reverse ? ... : i]: a run-time index would put `in` in local memory.
        T v[kN];
        if (o.reverse) {
#pragma unroll
            for (int i = 0; i < kN; ++i) v[i] = static_cast<T>(in[kN - 1 - i]);
        } else {
#pragma unroll
            for (int i = 0; i < kN; ++i) v[i] = static_cast<T>(in[i]);
        }
        Vec16 raw;
        std::memcpy(&raw, v, 16);
        *reinterpret_cast<Vec16*>(row + (o.reverse ? o.len - t0 - kN : t0)) = raw;
    } else {
#pragma unroll
        for (int i = 0; i < kN; ++i)
            if (t0 + i < o.len) row[o.pos(t0 + i)] = static_cast<T>(in[i]);
    }
}

// row[pos(t0 + i)] += in[i] for the steps below len. Hopper has 16-byte vector float atomics,
// which quarter the number of atomic transactions of the dB/dC accumulation.
template <int kN, typename Acc>
__device__ __forceinline__ void atomic_add_items(Acc* row, const ScanOrder& o, int t0, bool vec_ok,
                                                 const Acc (&in)[kN]) {
#if SEGMAMBA_VEC_ATOMICS
    if constexpr (std::is_same_v<Acc, float> && kN % 4 == 0) {
        if (vec_ok && o.slices == 1 && t0 + kN <= o.len) {
            float4* dst = reinterpret_cast<float4*>(row + (o.reverse ? o.len - t0 - kN : t0));
#pragma unroll
            for (int j = 0; j < kN / 4; ++j) {
                if (o.reverse)
                    atomicAdd(dst + j, make_float4(in[kN - 1 - 4 * j], in[kN - 2 - 4 * j], in[kN - 3 - 4 * j],
                                                   in[kN - 4 - 4 * j]));
                else
                    atomicAdd(dst + j, make_float4(in[4 * j], in[4 * j + 1], in[4 * j + 2], in[4 * j + 3]));
            }
            return;
        }
    }
#endif
#pragma unroll
    for (int i = 0; i < kN; ++i)
        if (t0 + i < o.len) atomicAdd(row + o.pos(t0 + i), in[i]);
}

// Order-independent exact sums for the deterministic backward. A term v is added as the
// fixed-point number floor(v * 2^52), split at bit lo_bits into a signed high part
// floor(v * 2^(52 - lo_bits)), summed with 64-bit integer atomics, and a low part in
// [0, 2^lo_bits), summed with 32-bit ones. Integer addition is associative, so the sums have
// the same bits whatever the order of the terms. The host picks lo_bits = min(31, 32 -
// ceil(log2(terms per element))), so the low sums cannot overflow; they are carried into the
// high part when read (fixed_value). Resolution 2^-52 (about 2.2e-16, absolute). The host
// bounds every |v| by limit = 2^(10 + lo_bits) / terms (2^34 / terms for 256 terms per
// element: sums below about 1.7e10), so that the high sums stay inside int64 with a factor 2
// to spare; a term beyond it, or not finite, sets *flag instead (the whole result then reads
// as NaN).
static_assert(kFixedFracBits == 52, "fixed_value's 0x1p-52");

struct FixedFormat {
    double hi_scale;  // 2^(52 - lo_bits)
    double lo_scale;  // 2^lo_bits
    double limit;
    int lo_bits;
};

// Every step is exact in Acc (float or double): scaling by powers of two, floor, and x - h,
// which is in [0, 1); the conversion to an integer drops the bits below 2^-52.
template <typename Acc>
__device__ __forceinline__ void fixed_add(unsigned long long* hi, unsigned* lo, Acc v, const FixedFormat& f,
                                          int* flag) {
    if (!(fabs(v) <= static_cast<Acc>(f.limit))) {  // NaN too
        atomicOr(flag, 1);
        return;
    }
    const Acc x = v * static_cast<Acc>(f.hi_scale);
    const Acc h = floor(x);
    atomicAdd(hi, static_cast<unsigned long long>(static_cast<long long>(h)));
    atomicAdd(lo, static_cast<unsigned>((x - h) * static_cast<Acc>(f.lo_scale)));
}

__device__ __forceinline__ double fixed_value(unsigned long long hi, unsigned lo, const FixedFormat& f) {
    const long long h = static_cast<long long>(hi + (lo >> f.lo_bits));  // two's complement wrap-around
    const unsigned rest = lo & ((1u << f.lo_bits) - 1);
    return static_cast<double>(h) / f.hi_scale + static_cast<double>(rest) * 0x1p-52;
}

__device__ __forceinline__ float exp_(float x) { return __expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }

template <typename Acc>
__device__ __forceinline__ Acc sigmoid_(Acc x) { return Acc(1) / (Acc(1) + exp_(-x)); }

// log(1 + e^x) without overflow: for x > 20 it equals x to float precision.
template <typename Acc>
__device__ __forceinline__ Acc softplus_(Acc x) { return x > Acc(20) ? x : log1p_(exp_(x)); }

template <typename Acc>
__device__ __forceinline__ Acc silu_(Acc x) { return x * sigmoid_(x); }

// d/dx [x * sigmoid(x)]
template <typename Acc>
__device__ __forceinline__ Acc dsilu_(Acc x) {
    const Acc s = sigmoid_(x);
    return s * (Acc(1) + x * (Acc(1) - s));
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    return v;
}

// The affine map h -> a * h + b. A linear recurrence h_t = a_t h_{t-1} + b_t is a
// composition of such maps, which is associative: that is what makes it scannable.
template <typename Acc>
struct Affine {
    Acc a, b;
};

// Apply `first`, then `second`.
template <typename Acc>
__device__ __forceinline__ Affine<Acc> compose(Affine<Acc> first, Affine<Acc> second) {
    return {first.a * second.a, second.a * first.b + second.b};
}

template <typename Acc>
struct WarpScan {
    Affine<Acc> exclusive, inclusive;
};

// Scan of one Affine per lane over a warp, in lane order (kReverse: from lane 31 down): the
// composition of the maps of the lanes before this one in scan order (identity for the
// first), and the one including this lane's.
template <bool kReverse, typename Acc>
__device__ __forceinline__ WarpScan<Acc> warp_scan(Affine<Acc> agg) {
    const int lane = threadIdx.x & 31;
    Affine<Acc> incl = agg;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        Affine<Acc> other;
        if constexpr (kReverse) {
            other.a = __shfl_down_sync(kFullMask, incl.a, off);
            other.b = __shfl_down_sync(kFullMask, incl.b, off);
            if (lane + off < 32) incl = compose(other, incl);
        } else {
            other.a = __shfl_up_sync(kFullMask, incl.a, off);
            other.b = __shfl_up_sync(kFullMask, incl.b, off);
            if (lane >= off) incl = compose(other, incl);
        }
    }
    Affine<Acc> ex;
    if constexpr (kReverse) {
        ex.a = __shfl_down_sync(kFullMask, incl.a, 1);
        ex.b = __shfl_down_sync(kFullMask, incl.b, 1);
        if (lane == 31) ex = {Acc(1), Acc(0)};
    } else {
        ex.a = __shfl_up_sync(kFullMask, incl.a, 1);
        ex.b = __shfl_up_sync(kFullMask, incl.b, 1);
        if (lane == 0) ex = {Acc(1), Acc(0)};
    }
    return {ex, incl};
}

// The same over the block, in thread order. `smem` holds 2 * warps entries; alternating
// `parity` between consecutive calls lets one barrier per call suffice, because a thread
// can only reach the next write of a parity after every thread has passed the barrier that
// follows the last read of it.
template <int kThreads, bool kReverse, typename Acc>
__device__ __forceinline__ Affine<Acc> block_exclusive_scan(Affine<Acc> agg, Affine<Acc>* smem, int parity) {
    constexpr int kWarps = kThreads / 32;
    static_assert(kThreads % 32 == 0, "whole warps");
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const WarpScan<Acc> w = warp_scan<kReverse>(agg);
    if (lane == (kReverse ? 0 : 31)) smem[parity * kWarps + warp] = w.inclusive;
    __syncthreads();
    Affine<Acc> prefix{Acc(1), Acc(0)};
#pragma unroll
    for (int i = 0; i < kWarps; ++i) {
        const int other = kReverse ? kWarps - 1 - i : i;
        if (kReverse ? other > warp : other < warp) prefix = compose(prefix, smem[parity * kWarps + other]);
    }
    return compose(prefix, w.exclusive);
}

}  // namespace segmamba_cuda
