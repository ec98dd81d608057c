// Device helpers shared by the scan and conv kernels: vector loads/stores,
// activations, the affine-map block scan, reductions.
#pragma once

#include <type_traits>

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "launch.h"

namespace segmamba_cuda {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr unsigned kFullMask = 0xffffffffu;

// kN consecutive items of a row starting at idx, as Acc; items at or beyond len read as 0.
// The vector path needs idx % kN == 0, a 16-byte aligned row start and idx + kN <= len.
template <int kN, typename T, typename Acc>
__device__ __forceinline__ void load_items(const T* __restrict__ row, int idx, int len, bool vec_ok,
                                           Acc (&out)[kN]) {
    static_assert(kN * sizeof(T) == 16, "one 16-byte vector per thread");
    if (vec_ok && idx + kN <= len) {
        const uint4 raw = *reinterpret_cast<const uint4*>(row + idx);
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < kN; ++i) out[i] = static_cast<Acc>(v[i]);
    } else {
#pragma unroll
        for (int i = 0; i < kN; ++i) out[i] = idx + i < len ? static_cast<Acc>(row[idx + i]) : Acc(0);
    }
}

template <int kN, typename T, typename Acc>
__device__ __forceinline__ void store_items(T* __restrict__ row, int idx, int len, bool vec_ok,
                                            const Acc (&in)[kN]) {
    static_assert(kN * sizeof(T) == 16, "one 16-byte vector per thread");
    if (vec_ok && idx + kN <= len) {
        uint4 raw;
        T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int i = 0; i < kN; ++i) v[i] = static_cast<T>(in[i]);
        *reinterpret_cast<uint4*>(row + idx) = raw;
    } else {
#pragma unroll
        for (int i = 0; i < kN; ++i)
            if (idx + i < len) row[idx + i] = static_cast<T>(in[i]);
    }
}

// row[idx + i] += in[i] for the items below len. Hopper has 16-byte vector float atomics,
// which quarter the number of atomic transactions of the dB/dC accumulation.
template <int kN, typename Acc>
__device__ __forceinline__ void atomic_add_items(Acc* row, int idx, int len, bool vec_ok, const Acc (&in)[kN]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (std::is_same_v<Acc, float> && kN % 4 == 0) {
        if (vec_ok && idx + kN <= len) {
#pragma unroll
            for (int j = 0; j < kN / 4; ++j)
                atomicAdd(reinterpret_cast<float4*>(row + idx) + j,
                          make_float4(in[4 * j], in[4 * j + 1], in[4 * j + 2], in[4 * j + 3]));
            return;
        }
    }
#endif
#pragma unroll
    for (int i = 0; i < kN; ++i)
        if (idx + i < len) atomicAdd(row + idx + i, in[i]);
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

// Exclusive scan of one Affine per thread over the block, in thread order (kReverse:
// from the last thread down). Returns the composition of the maps of all threads
// before this one in scan order (identity for the first). `smem` holds 2 * warps
// entries; alternating `parity` between consecutive calls lets one barrier per call
// suffice, because a thread can only reach the next write of a parity after every
// thread has passed the barrier that follows the last read of it.
template <int kThreads, bool kReverse, typename Acc>
__device__ __forceinline__ Affine<Acc> block_exclusive_scan(Affine<Acc> agg, Affine<Acc>* smem, int parity) {
    constexpr int kWarps = kThreads / 32;
    static_assert(kThreads % 32 == 0, "whole warps");
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
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
        if (lane == 0) smem[parity * kWarps + warp] = incl;
    } else {
        ex.a = __shfl_up_sync(kFullMask, incl.a, 1);
        ex.b = __shfl_up_sync(kFullMask, incl.b, 1);
        if (lane == 0) ex = {Acc(1), Acc(0)};
        if (lane == 31) smem[parity * kWarps + warp] = incl;
    }
    __syncthreads();
    Affine<Acc> prefix{Acc(1), Acc(0)};
#pragma unroll
    for (int i = 0; i < kWarps; ++i) {
        const int w = kReverse ? kWarps - 1 - i : i;
        if (kReverse ? w > warp : w < warp) prefix = compose(prefix, smem[parity * kWarps + w]);
    }
    return compose(prefix, ex);
}

}  // namespace segmamba_cuda
