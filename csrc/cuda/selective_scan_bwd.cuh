// Selective scan, backward. Two passes per (batch, channel, segment) block, after the
// carries into the segments (selective_scan_segments.cuh) when there are several:
//  1. scan_fwd_kernel<kBwdPrep> records the state at each chunk start (batch, dim,
//     nchunks, N) -- 1/chunk of the full state tensor -- and writes dz.
//  2. scan_bwd_kernel walks its chunks last to first. Per state n it recomputes the
//     chunk's states h_t from the recorded start (forward block scan), then runs the
//     adjoint recurrence backwards in time (reverse block scan):
//         g_t = C_t dy_t + s_t,   s_{t-1} = a_t g_t,   a_t = exp(dt_t A_n)
//     where g_t = dLoss/dh_t and s_t is the part flowing in from step t+1. With
//     h_t = a_t h_{t-1} + dt_t B_t u_t:
//         dB_t += g_t dt_t u_t         dC_t += dy_t h_t
//         du_t += g_t dt_t B_t         ddt_t += g_t (B_t u_t + A_n a_t h_{t-1})
//         dA_n += g_t a_t h_{t-1} dt_t
//     dB/dC are shared by every channel of a group: accumulated with atomics into
//     float buffers. dA, dD, ddelta_bias are summed in the block first.
#pragma once

#include "selective_scan_fwd.cuh"

namespace segmamba_cuda {

// minBlocks = 1 lets ptxas use ~145 registers instead of spilling at 128: the grid is
// only batch * dim blocks, so more resident blocks per SM would rarely be filled anyway.
template <typename T, bool kHasZ>
__global__ void __launch_bounds__(kScanThreads, 1) scan_bwd_kernel(const ScanParams p) {
    using Acc = acc_t<T>;
    constexpr int kN = vec_items<T>();
    constexpr int kChunk = kScanThreads * kN;
    constexpr int kWarps = kScanThreads / 32;

    __shared__ Acc A_s[kMaxState];
    __shared__ Acc carry_s[kMaxState];           // s at the end of the chunk, from the chunk after
    __shared__ Acc dA_s[kWarps * kMaxState];     // per-warp partial dA
    __shared__ Affine<Acc> scan_s[2 * kWarps];
    __shared__ Acc red_s[kWarps][2];

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int bd = blockIdx.x;
    const int seg = blockIdx.y;
    const int b = bd / p.dim;
    const int d = bd % p.dim;
    const int g = d / (p.dim / p.groups);
    const int L = p.seqlen;
    const int N = p.dstate;
    const int64_t row = int64_t(bd) * L;
    const int64_t group_off = (int64_t(b) * p.groups + g) * N * L;

    const T* u = static_cast<const T*>(p.u) + row;
    const T* delta = static_cast<const T*>(p.delta) + row;
    const T* dout = static_cast<const T*>(p.dout) + row;
    const T* Bg = static_cast<const T*>(p.B) + group_off;
    const T* Cg = static_cast<const T*>(p.C) + group_off;
    Acc* dBg = static_cast<Acc*>(p.dB) + group_off;
    Acc* dCg = static_cast<Acc*>(p.dC) + group_off;
    const Acc* chunk_states = static_cast<const Acc*>(p.chunk_states) + int64_t(bd) * p.nchunks * N;
    const Acc* A = static_cast<const Acc*>(p.A) + int64_t(d) * N;
    const Acc Dd = static_cast<const Acc*>(p.D)[d];
    const Acc bias = static_cast<const Acc*>(p.delta_bias)[d];

    for (int n = tid; n < N; n += kScanThreads) {
        A_s[n] = A[n];
        carry_s[n] = p.nseg > 1 ? static_cast<const Acc*>(p.seg_states)[(int64_t(bd) * p.nseg + seg) * N + n] : Acc(0);
    }
    for (int i = tid; i < kWarps * kMaxState; i += kScanThreads) dA_s[i] = Acc(0);

    Acc dD_acc = Acc(0), dbias_acc = Acc(0);
    int parity = 0;
    const int c_begin = seg * p.chunks_per_seg;
    const int c_end = min(p.nchunks, c_begin + p.chunks_per_seg);
    for (int c = c_end - 1; c >= c_begin; --c) {
        __syncthreads();  // carry_s written by thread 0 in the chunk after
        const int t0 = c * kChunk + tid * kN;
        Acc uv[kN], xv[kN], dt[kN], dy[kN], du[kN], ddt[kN];
        load_items<kN>(u, t0, L, p.vec_ok, uv);
        load_items<kN>(delta, t0, L, p.vec_ok, xv);
        load_items<kN>(dout, t0, L, p.vec_ok, dy);  // 0 past L: every gradient there vanishes
        if constexpr (kHasZ) {
            Acc zv[kN];
            load_items<kN>(static_cast<const T*>(p.z) + row, t0, L, p.vec_ok, zv);
#pragma unroll
            for (int i = 0; i < kN; ++i) dy[i] *= silu_(zv[i]);
        }
#pragma unroll
        for (int i = 0; i < kN; ++i) {
            xv[i] += bias;
            dt[i] = t0 + i < L ? (p.softplus ? softplus_(xv[i]) : xv[i]) : Acc(0);
            du[i] = Dd * dy[i];
            ddt[i] = Acc(0);
            dD_acc += dy[i] * uv[i];
        }

#pragma unroll 1
        for (int n = 0; n < N; ++n) {
            Acc Bv[kN], Cv[kN], av[kN], hprev[kN];
            load_items<kN>(Bg + int64_t(n) * L, t0, L, p.vec_ok, Bv);
            load_items<kN>(Cg + int64_t(n) * L, t0, L, p.vec_ok, Cv);
            const Acc An = A_s[n];

            // States of this chunk, from the recorded state at its start.
            Acc h0 = Acc(0);
            Affine<Acc> agg{Acc(1), Acc(0)};
            if (tid == 0) {
                h0 = chunk_states[int64_t(c) * N + n];
                agg.b = h0;
            }
#pragma unroll
            for (int i = 0; i < kN; ++i) {
                av[i] = exp_(dt[i] * An);
                agg = compose(agg, Affine<Acc>{av[i], dt[i] * uv[i] * Bv[i]});
            }
            const Affine<Acc> ex = block_exclusive_scan<kScanThreads, false>(agg, scan_s, parity);
            parity ^= 1;
            Acc h = tid == 0 ? h0 : ex.b;
#pragma unroll
            for (int i = 0; i < kN; ++i) {
                hprev[i] = h;
                h = av[i] * h + dt[i] * uv[i] * Bv[i];
            }

            // Adjoint, last step first: the map s_t -> s_{t-1} = a_t (s_t + C_t dy_t).
            Acc s_end = Acc(0);
            Affine<Acc> ragg{Acc(1), Acc(0)};
            if (tid == kScanThreads - 1) {
                s_end = carry_s[n];
                ragg.b = s_end;
            }
#pragma unroll
            for (int i = kN - 1; i >= 0; --i) ragg = compose(ragg, Affine<Acc>{av[i], av[i] * Cv[i] * dy[i]});
            const Affine<Acc> rex = block_exclusive_scan<kScanThreads, true>(ragg, scan_s, parity);
            parity ^= 1;
            Acc s = tid == kScanThreads - 1 ? s_end : rex.b;

            Acc dA_loc = Acc(0);
            Acc dBv[kN], dCv[kN];
#pragma unroll
            for (int i = kN - 1; i >= 0; --i) {
                const Acc gt = Cv[i] * dy[i] + s;
                const Acc ht = av[i] * hprev[i] + dt[i] * uv[i] * Bv[i];
                const Acc gah = gt * av[i] * hprev[i];
                dBv[i] = gt * dt[i] * uv[i];
                dCv[i] = dy[i] * ht;
                du[i] += gt * dt[i] * Bv[i];
                ddt[i] += gt * Bv[i] * uv[i] + An * gah;
                dA_loc += gah * dt[i];
                s = av[i] * gt;
            }
            if (tid == 0) carry_s[n] = s;
            atomic_add_items<kN>(dBg + int64_t(n) * L, t0, L, p.vec_ok, dBv);
            atomic_add_items<kN>(dCg + int64_t(n) * L, t0, L, p.vec_ok, dCv);
            dA_loc = warp_sum(dA_loc);
            if (lane == 0) dA_s[warp * kMaxState + n] += dA_loc;
        }

#pragma unroll
        for (int i = 0; i < kN; ++i) {
            if (p.softplus) ddt[i] *= sigmoid_(xv[i]);  // d softplus(x) / dx
            dbias_acc += ddt[i];                        // 0 past L
        }
        store_items<kN>(static_cast<T*>(p.du) + row, t0, L, p.vec_ok, du);
        store_items<kN>(static_cast<T*>(p.ddelta) + row, t0, L, p.vec_ok, ddt);
    }

    dD_acc = warp_sum(dD_acc);
    dbias_acc = warp_sum(dbias_acc);
    if (lane == 0) {
        red_s[warp][0] = dD_acc;
        red_s[warp][1] = dbias_acc;
    }
    __syncthreads();
    if (tid == 0) {
        Acc sD = Acc(0), sb = Acc(0);
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            sD += red_s[w][0];
            sb += red_s[w][1];
        }
        atomicAdd(static_cast<Acc*>(p.dD) + d, sD);
        atomicAdd(static_cast<Acc*>(p.ddelta_bias) + d, sb);
    }
    for (int n = tid; n < N; n += kScanThreads) {
        Acc s = Acc(0);
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += dA_s[w * kMaxState + n];
        atomicAdd(static_cast<Acc*>(p.dA) + int64_t(d) * N + n, s);
    }
}

template <typename T, bool kHasZ>
void launch_scan_bwd_kernels(const ScanParams& p, cudaStream_t stream) {
    if (p.nchunks == 1 && !kHasZ) {
        // A single chunk starts from the zero state, and there is no dz to compute.
        C10_CUDA_CHECK(cudaMemsetAsync(p.chunk_states, 0,
                                       size_t(p.batch) * p.dim * p.dstate * sizeof(acc_t<T>), stream));
    } else {
        launch_segment_carries<T, false, false>(p, stream);
        launch_scan_fwd_kernel<T, kHasZ, true>(p, stream);
    }
    // seg_states now switches from the states h entering each segment (read by the
    // pass above) to the adjoint s entering each segment from its end.
    launch_segment_carries<T, kHasZ, true>(p, stream);
    scan_bwd_kernel<T, kHasZ><<<dim3(p.batch * p.dim, p.nseg), kScanThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void scan_bwd_launch(const ScanParams& p, cudaStream_t stream) {
    if (p.z != nullptr)
        launch_scan_bwd_kernels<T, true>(p, stream);
    else
        launch_scan_bwd_kernels<T, false>(p, stream);
}

}  // namespace segmamba_cuda

#define SEGMAMBA_INSTANTIATE_SCAN_BWD(T) \
    template void segmamba_cuda::scan_bwd_launch<T>(const segmamba_cuda::ScanParams&, cudaStream_t);
