// Carries across segments of a long sequence, so that every (batch, channel,
// segment) can run as its own block.
//
// scan_segment_map_kernel: per segment and state n, the composition of the step maps
// over the segment -- forward: h_end = a * h_start + b with steps (a_t, dt_t B_t u_t);
// reverse (adjoint of the backward): s_start = a * s_end + b with steps
// (a_t, a_t C_t dy_t), composed from the last step down.
// scan_segment_prefix_kernel: one thread per (batch, channel, n) chains the maps over
// the segments and records the carry entering each segment (h at its start, or s
// at its end for the reverse).
#pragma once

#include "common.cuh"

namespace segmamba_cuda {

template <typename T, bool kHasZ, bool kReverse>
__global__ void __launch_bounds__(kScanThreads) scan_segment_map_kernel(const ScanParams p) {
    using Acc = acc_t<T>;
    constexpr int kN = vec_items<T>();
    constexpr int kChunk = kScanThreads * kN;
    constexpr int kWarps = kScanThreads / 32;
    // The thread whose map comes first in scan order folds in the carry; the last one
    // ends with the composition over the whole chunk.
    constexpr int kFirst = kReverse ? kScanThreads - 1 : 0;
    constexpr int kLast = kReverse ? 0 : kScanThreads - 1;

    __shared__ Acc A_s[kMaxState];
    __shared__ Affine<Acc> carry_s[kMaxState];
    __shared__ Affine<Acc> scan_s[2 * kWarps];

    const int tid = threadIdx.x;
    const int bd = blockIdx.x;
    const int seg = blockIdx.y;
    const int b = bd / p.dim;
    const int d = bd % p.dim;
    const int g = d / (p.dim / p.groups);
    const int L = p.seqlen;
    const int N = p.dstate;
    const int64_t row = int64_t(bd) * L;
    const ScanOrder order = order_of(p);
    const int64_t group_off = (int64_t(b) * p.groups + g) * N * L;
    // Forward steps need u and B, reverse steps dout (z) and C.
    const T* BC = static_cast<const T*>(kReverse ? p.C : p.B) + group_off;
    const Acc bias = static_cast<const Acc*>(p.delta_bias)[d];
    const int c_begin = seg * p.chunks_per_seg;
    const int c_count = min(p.nchunks - c_begin, p.chunks_per_seg);

    for (int n = tid; n < N; n += kScanThreads) {
        A_s[n] = static_cast<const Acc*>(p.A)[int64_t(d) * N + n];
        carry_s[n] = {Acc(1), Acc(0)};
    }

    int parity = 0;
    for (int k = 0; k < c_count; ++k) {
        __syncthreads();
        const int c = kReverse ? c_begin + c_count - 1 - k : c_begin + k;
        const int t0 = c * kChunk + tid * kN;
        Acc dt[kN], w[kN];  // w: dt * u (forward) or dy (reverse)
        load_items<kN>(static_cast<const T*>(p.delta) + row, order, t0, p.vec_ok, dt);
        if constexpr (kReverse) {
            load_items<kN>(static_cast<const T*>(p.dout) + row, order, t0, p.vec_ok, w);  // 0 past L
            if constexpr (kHasZ) {
                Acc zv[kN];
                load_items<kN>(static_cast<const T*>(p.z) + row, order, t0, p.vec_ok, zv);
#pragma unroll
                for (int i = 0; i < kN; ++i) w[i] *= silu_(zv[i]);
            }
        } else {
            load_items<kN>(static_cast<const T*>(p.u) + row, order, t0, p.vec_ok, w);  // 0 past L
        }
#pragma unroll
        for (int i = 0; i < kN; ++i) {
            const Acc x = dt[i] + bias;
            dt[i] = t0 + i < L ? (p.softplus ? softplus_(x) : x) : Acc(0);  // identity step past L
            if constexpr (!kReverse) w[i] *= dt[i];
        }

#pragma unroll 1
        for (int n = 0; n < N; ++n) {
            Acc v[kN];
            load_items<kN>(BC + int64_t(n) * L, order, t0, p.vec_ok, v);
            const Acc An = A_s[n];
            Affine<Acc> agg{Acc(1), Acc(0)};
            if (tid == kFirst) agg = carry_s[n];
#pragma unroll
            for (int j = 0; j < kN; ++j) {
                const int i = kReverse ? kN - 1 - j : j;
                const Acc a = exp_(dt[i] * An);
                agg = compose(agg, Affine<Acc>{a, kReverse ? a * v[i] * w[i] : v[i] * w[i]});
            }
            const Affine<Acc> ex = block_exclusive_scan<kScanThreads, kReverse>(agg, scan_s, parity);
            parity ^= 1;
            if (tid == kLast) carry_s[n] = compose(ex, agg);
        }
    }
    __syncthreads();
    Affine<Acc>* maps = static_cast<Affine<Acc>*>(p.seg_maps) + (int64_t(bd) * p.nseg + seg) * N;
    for (int n = tid; n < N; n += kScanThreads) maps[n] = carry_s[n];
}

template <typename Acc, bool kReverse>
__global__ void scan_segment_prefix_kernel(const ScanParams p) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int N = p.dstate;
    if (i >= int64_t(p.batch) * p.dim * N) return;
    const int64_t base = (i / N) * p.nseg * N + i % N;
    const Affine<Acc>* maps = static_cast<const Affine<Acc>*>(p.seg_maps) + base;
    Acc* carries = static_cast<Acc*>(p.seg_states) + base;
    Acc h = Acc(0);
    for (int k = 0; k < p.nseg; ++k) {
        const int64_t s = int64_t(kReverse ? p.nseg - 1 - k : k) * N;
        carries[s] = h;
        const Affine<Acc> m = maps[s];
        h = m.a * h + m.b;
    }
}

// Fills p.seg_states with the carry entering every segment; nothing to do for one segment.
template <typename T, bool kHasZ, bool kReverse>
void launch_segment_carries(const ScanParams& p, cudaStream_t stream) {
    if (p.nseg == 1) return;
    launch_kernel(scan_segment_map_kernel<T, kHasZ, kReverse>, dim3(p.batch * p.dim, p.nseg), dim3(kScanThreads),
                  stream, p);
    constexpr int kPrefixThreads = 256;
    const int64_t threads = int64_t(p.batch) * p.dim * p.dstate;
    const unsigned blocks = static_cast<unsigned>((threads + kPrefixThreads - 1) / kPrefixThreads);
    launch_kernel(scan_segment_prefix_kernel<acc_t<T>, kReverse>, dim3(blocks), dim3(kPrefixThreads), stream, p);
}

}  // namespace segmamba_cuda
