// Selective scan, forward sweep. One block per (batch, channel, segment) walks its
// segment in chunks of kScanThreads * kN steps; each thread owns kN consecutive steps. For
// every state n the block scans the per-thread affine maps (decay, input), the first
// thread folding in the state carried from the previous chunk (or segment, see
// selective_scan_segments.cuh), and the last thread hands the chunk's final state on
// through shared memory.
//
// The same kernel is the first pass of the backward (kBwdPrep): it then records the
// state at every chunk start (deterministic backward: at the start of every warp's share
// of a chunk), and computes dz, which needs the full y = C.h + D u.
#pragma once

#include "selective_scan_segments.cuh"

namespace segmamba_cuda {

// minBlocks = 4 (at most 128 registers): without it ptxas spills the z + backward-prep
// variant on sm_80 while aiming for 72 registers.
template <typename T, bool kHasZ, bool kBwdPrep>
__global__ void __launch_bounds__(kScanThreads, 4) scan_fwd_kernel(const ScanParams p) {
    using Acc = acc_t<T>;
    constexpr int kN = vec_items<T>();
    constexpr int kChunk = kScanThreads * kN;
    constexpr int kWarps = kScanThreads / 32;
    // The backward prep pass without gate needs the states only, not y.
    constexpr bool kNeedY = !kBwdPrep || kHasZ;

    __shared__ Acc A_s[kMaxState];
    __shared__ Acc carry_s[kMaxState];
    __shared__ Affine<Acc> scan_s[2 * kWarps];

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int bd = blockIdx.x;  // batch * dim + channel
    const int seg = blockIdx.y;
    const int b = bd / p.dim;
    const int d = bd % p.dim;
    const int g = d / (p.dim / p.groups);
    const int L = p.seqlen;
    const int N = p.dstate;
    const int64_t row = int64_t(bd) * L;
    const ScanOrder order = order_of(p);

    const T* u = static_cast<const T*>(p.u) + row;
    const T* delta = static_cast<const T*>(p.delta) + row;
    const T* Bg = static_cast<const T*>(p.B) + (int64_t(b) * p.groups + g) * N * L;
    const T* Cg = static_cast<const T*>(p.C) + (int64_t(b) * p.groups + g) * N * L;
    const Acc* A = static_cast<const Acc*>(p.A) + int64_t(d) * N;
    const Acc Dd = static_cast<const Acc*>(p.D)[d];
    const Acc bias = static_cast<const Acc*>(p.delta_bias)[d];

    for (int n = tid; n < N; n += kScanThreads) {
        A_s[n] = A[n];
        carry_s[n] = p.nseg > 1 ? static_cast<const Acc*>(p.seg_states)[(int64_t(bd) * p.nseg + seg) * N + n] : Acc(0);
    }

    const int c_begin = seg * p.chunks_per_seg;
    const int c_end = min(p.nchunks, c_begin + p.chunks_per_seg);
    int parity = 0;
    for (int c = c_begin; c < c_end; ++c) {
        __syncthreads();  // carry_s written by the last thread in the previous chunk
        const int t0 = c * kChunk + tid * kN;
        Acc uv[kN], dt[kN], dtu[kN], y[kN];
        load_items<kN>(u, order, t0, p.vec_ok, uv);
        load_items<kN>(delta, order, t0, p.vec_ok, dt);
#pragma unroll
        for (int i = 0; i < kN; ++i) {
            Acc x = dt[i] + bias;
            if (p.softplus) x = softplus_(x);
            // Steps past L become the identity map (decay 1, input 0), so the state
            // reaches the last thread unchanged.
            dt[i] = t0 + i < L ? x : Acc(0);
            dtu[i] = dt[i] * uv[i];
            y[i] = Acc(0);
        }

#pragma unroll 1
        for (int n = 0; n < N; ++n) {
            Acc Bv[kN], Cv[kN], av[kN];
            load_items<kN>(Bg + int64_t(n) * L, order, t0, p.vec_ok, Bv);
            if constexpr (kNeedY) load_items<kN>(Cg + int64_t(n) * L, order, t0, p.vec_ok, Cv);
            const Acc An = A_s[n];
            Acc carry = Acc(0);
            Affine<Acc> agg{Acc(1), Acc(0)};
            if (tid == 0) {
                carry = carry_s[n];
                agg.b = carry;
            }
#pragma unroll
            for (int i = 0; i < kN; ++i) {
                av[i] = exp_(dt[i] * An);
                agg = compose(agg, Affine<Acc>{av[i], dtu[i] * Bv[i]});
            }
            const Affine<Acc> ex = block_exclusive_scan<kScanThreads, false>(agg, scan_s, parity);
            parity ^= 1;
            Acc h = tid == 0 ? carry : ex.b;
            if constexpr (kBwdPrep) {
                // The state before this thread's steps is what its warp starts from.
                if (lane == 0 && (warp == 0 || p.states_per_chunk == kWarps)) {
                    const int64_t k = int64_t(c) * p.states_per_chunk + (p.states_per_chunk == kWarps ? warp : 0);
                    static_cast<Acc*>(p.chunk_states)[(int64_t(bd) * p.nchunks * p.states_per_chunk + k) * N + n] = h;
                }
            }
#pragma unroll
            for (int i = 0; i < kN; ++i) {
                h = av[i] * h + dtu[i] * Bv[i];
                if constexpr (kNeedY) y[i] += Cv[i] * h;
            }
            if (tid == kScanThreads - 1) {
                carry_s[n] = h;
                if constexpr (!kBwdPrep)
                    if (c == p.nchunks - 1) static_cast<Acc*>(p.last_state)[int64_t(bd) * N + n] = h;
            }
        }

        if constexpr (!kBwdPrep) {
            if constexpr (kHasZ) {
                Acc zv[kN];
                load_items<kN>(static_cast<const T*>(p.z) + row, order, t0, p.vec_ok, zv);
#pragma unroll
                for (int i = 0; i < kN; ++i) y[i] = (y[i] + Dd * uv[i]) * silu_(zv[i]);
            } else {
#pragma unroll
                for (int i = 0; i < kN; ++i) y[i] += Dd * uv[i];
            }
            store_items<kN>(static_cast<T*>(p.out) + row, order, t0, p.vec_ok, y);
        } else if constexpr (kHasZ) {
            Acc zv[kN], dout[kN];
            load_items<kN>(static_cast<const T*>(p.z) + row, order, t0, p.vec_ok, zv);
            load_items<kN>(static_cast<const T*>(p.dout) + row, order, t0, p.vec_ok, dout);
#pragma unroll
            for (int i = 0; i < kN; ++i) y[i] = dout[i] * (y[i] + Dd * uv[i]) * dsilu_(zv[i]);
            store_items<kN>(static_cast<T*>(p.dz) + row, order, t0, p.vec_ok, y);
        }
    }
}

template <typename T, bool kHasZ, bool kBwdPrep>
void launch_scan_fwd_kernel(const ScanParams& p, cudaStream_t stream) {
    launch_kernel(scan_fwd_kernel<T, kHasZ, kBwdPrep>, dim3(p.batch * p.dim, p.nseg), dim3(kScanThreads), stream, p);
}

template <typename T>
void scan_fwd_launch(const ScanParams& p, cudaStream_t stream) {
    // The segment maps of the forward do not involve z.
    launch_segment_carries<T, false, false>(p, stream);
    if (p.z != nullptr)
        launch_scan_fwd_kernel<T, true, false>(p, stream);
    else
        launch_scan_fwd_kernel<T, false, false>(p, stream);
}

}  // namespace segmamba_cuda

#define SEGMAMBA_INSTANTIATE_SCAN_FWD(T) \
    template void segmamba_cuda::scan_fwd_launch<T>(const segmamba_cuda::ScanParams&, cudaStream_t);
