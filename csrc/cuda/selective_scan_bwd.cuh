// Selective scan, backward. Two passes per (batch, channel, segment), after the carries
// into the segments (selective_scan_segments.cuh) when there are several:
//  1. scan_fwd_kernel<kBwdPrep> records the state at each chunk start (batch, dim,
//     nchunks, N) -- 1/chunk of the full state tensor -- and writes dz.
//  2. scan_bwd_kernel walks its chunks last to first. Per state n it recomputes the
//     chunk's states h_t from the recorded start (forward scan), then runs the adjoint
//     recurrence backwards in time (reverse scan):
//         g_t = C_t dy_t + s_t,   s_{t-1} = a_t g_t,   a_t = exp(dt_t A_n)
//     where g_t = dLoss/dh_t and s_t is the part flowing in from step t+1. With
//     h_t = a_t h_{t-1} + dt_t B_t u_t:
//         dB_t += g_t dt_t u_t         dC_t += dy_t h_t
//         du_t += g_t dt_t B_t         ddt_t += g_t (B_t u_t + A_n a_t h_{t-1})
//         dA_n += g_t a_t h_{t-1} dt_t
//
// dB/dC are shared by every channel of a group, dA, dD, ddelta_bias by every batch element
// and segment. By default the block is one channel, its threads walk a chunk together
// (block scans), and those sums use float atomics: their last bits depend on the order in
// which blocks run. Deterministic (kDet): each warp walks one channel (warp scans, in
// 32 * kN-step shares of a chunk, whose start states the first pass then records), a block
// holds kDetChannels channels of one group and adds their dB/dC terms in warp order, and
// the block sums go into fixed-point sums (common.cuh: fixed_add), which are exact and so
// independent of the order; dA, dD, ddelta_bias go to per-block partials that
// scan_partials_kernel adds up in a fixed order.
#pragma once

#include "selective_scan_fwd.cuh"

namespace segmamba_cuda {

// minBlocks = 1 lets ptxas use ~145 registers instead of spilling at 128: the grid is
// only batch * dim blocks, so more resident blocks per SM would rarely be filled anyway.
template <typename T, bool kHasZ, bool kDet>
__global__ void __launch_bounds__(kScanThreads, 1) scan_bwd_kernel(const ScanParams p) {
    using Acc = acc_t<T>;
    constexpr int kN = vec_items<T>();
    constexpr int kWarps = kScanThreads / 32;
    // A scan group walks one channel: the block, or (kDet) each warp.
    constexpr int kGroup = kDet ? 32 : kScanThreads;
    constexpr int kChannels = kScanThreads / kGroup;
    constexpr int kGroupChunk = kGroup * kN;  // steps a group walks at once
    static_assert(!kDet || kChannels == kDetChannels, "launch.h: kDetChannels");

    __shared__ Acc A_s[kChannels][kMaxState];
    __shared__ Acc carry_s[kChannels][kMaxState];  // s at the end of the group's steps, from the steps after
    __shared__ Acc dA_s[kWarps * kMaxState];       // per-warp partial dA
    __shared__ Affine<Acc> scan_s[2 * kWarps];
    __shared__ Acc red_s[kWarps][2];
    // kDet: every channel's dB (0) and dC (1) terms of the current steps, two parities.
    __shared__ std::conditional_t<kDet, Acc[2][2][kChannels][kGroupChunk], Acc[1]> xch_s;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int group = kDet ? warp : 0;
    const int rank = kDet ? lane : tid;  // in the scan group
    const int seg = blockIdx.y;
    const int cpg = p.dim / p.groups;
    int b, d;
    bool active = true;  // kDet: the last block of a group may have fewer channels than warps
    if constexpr (kDet) {
        const int bg = blockIdx.x / p.channel_blocks;  // batch * groups + group
        const int local = (blockIdx.x % p.channel_blocks) * kChannels + warp;
        active = local < cpg;
        b = bg / p.groups;
        d = (bg % p.groups) * cpg + min(local, cpg - 1);  // an idle warp repeats a channel, writes nothing
    } else {
        b = blockIdx.x / p.dim;
        d = blockIdx.x % p.dim;
    }
    const int bd = b * p.dim + d;
    const int g = d / cpg;
    const int L = p.seqlen;
    const int N = p.dstate;
    const int64_t row = int64_t(bd) * L;
    const int64_t group_off = (int64_t(b) * p.groups + g) * N * L;
    const ScanOrder order = order_of(p);

    const T* u = static_cast<const T*>(p.u) + row;
    const T* delta = static_cast<const T*>(p.delta) + row;
    const T* dout = static_cast<const T*>(p.dout) + row;
    const T* Bg = static_cast<const T*>(p.B) + group_off;
    const T* Cg = static_cast<const T*>(p.C) + group_off;
    const int states_per_row = p.nchunks * p.states_per_chunk;
    const Acc* chunk_states = static_cast<const Acc*>(p.chunk_states) + int64_t(bd) * states_per_row * N;
    const Acc* A = static_cast<const Acc*>(p.A) + int64_t(d) * N;
    const Acc Dd = static_cast<const Acc*>(p.D)[d];
    const Acc bias = static_cast<const Acc*>(p.delta_bias)[d];

    for (int n = rank; n < N; n += kGroup) {
        A_s[group][n] = A[n];
        carry_s[group][n] =
            p.nseg > 1 ? static_cast<const Acc*>(p.seg_states)[(int64_t(bd) * p.nseg + seg) * N + n] : Acc(0);
    }
    for (int i = tid; i < kWarps * kMaxState; i += kScanThreads) dA_s[i] = Acc(0);

    Acc dD_acc = Acc(0), dbias_acc = Acc(0);
    int parity = 0;
    // The segment's chunks, in units of group steps.
    const int j_begin = seg * p.chunks_per_seg * kChannels;
    const int j_end = min(p.nchunks, (seg + 1) * p.chunks_per_seg) * kChannels;
    for (int j = j_end - 1; j >= j_begin; --j) {
        __syncthreads();  // carry_s written by the group's first thread in the steps after
        const int t0 = j * kGroupChunk + rank * kN;
        Acc uv[kN], xv[kN], dt[kN], dy[kN], du[kN], ddt[kN];
        load_items<kN>(u, order, t0, p.vec_ok, uv);
        load_items<kN>(delta, order, t0, p.vec_ok, xv);
        load_items<kN>(dout, order, t0, p.vec_ok, dy);  // 0 past L: every gradient there vanishes
        if constexpr (kHasZ) {
            Acc zv[kN];
            load_items<kN>(static_cast<const T*>(p.z) + row, order, t0, p.vec_ok, zv);
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
            load_items<kN>(Bg + int64_t(n) * L, order, t0, p.vec_ok, Bv);
            load_items<kN>(Cg + int64_t(n) * L, order, t0, p.vec_ok, Cv);
            const Acc An = A_s[group][n];

            // States of these steps, from the recorded state at their start.
            Acc h0 = Acc(0);
            Affine<Acc> agg{Acc(1), Acc(0)};
            if (rank == 0) {
                h0 = chunk_states[int64_t(j) * N + n];
                agg.b = h0;
            }
#pragma unroll
            for (int i = 0; i < kN; ++i) {
                av[i] = exp_(dt[i] * An);
                agg = compose(agg, Affine<Acc>{av[i], dt[i] * uv[i] * Bv[i]});
            }
            Affine<Acc> ex;
            if constexpr (kDet) {
                ex = warp_scan<false>(agg).exclusive;
            } else {
                ex = block_exclusive_scan<kScanThreads, false>(agg, scan_s, parity);
                parity ^= 1;
            }
            Acc h = rank == 0 ? h0 : ex.b;
#pragma unroll
            for (int i = 0; i < kN; ++i) {
                hprev[i] = h;
                h = av[i] * h + dt[i] * uv[i] * Bv[i];
            }

            // Adjoint, last step first: the map s_t -> s_{t-1} = a_t (s_t + C_t dy_t).
            Acc s_end = Acc(0);
            Affine<Acc> ragg{Acc(1), Acc(0)};
            if (rank == kGroup - 1) {
                s_end = carry_s[group][n];
                ragg.b = s_end;
            }
#pragma unroll
            for (int i = kN - 1; i >= 0; --i) ragg = compose(ragg, Affine<Acc>{av[i], av[i] * Cv[i] * dy[i]});
            Affine<Acc> rex;
            if constexpr (kDet) {
                rex = warp_scan<true>(ragg).exclusive;
            } else {
                rex = block_exclusive_scan<kScanThreads, true>(ragg, scan_s, parity);
                parity ^= 1;
            }
            Acc s = rank == kGroup - 1 ? s_end : rex.b;

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
            dA_loc = warp_sum(dA_loc);
            if (lane == 0) dA_s[warp * kMaxState + n] += dA_loc;
            if constexpr (kDet) {
                // The block's channels' terms, summed in warp order, then into the fixed-point sums.
                Acc(&xb)[kChannels][kGroupChunk] = xch_s[parity][0];
                Acc(&xc)[kChannels][kGroupChunk] = xch_s[parity][1];
#pragma unroll
                for (int i = 0; i < kN; ++i) {
                    xb[warp][lane * kN + i] = active ? dBv[i] : Acc(0);
                    xc[warp][lane * kN + i] = active ? dCv[i] : Acc(0);
                }
                __syncthreads();
                // After the barrier: the warp's last lane read carry_s[group][n] before it, and
                // a warp shuffle does not order shared-memory accesses.
                if (rank == 0) carry_s[group][n] = s;
                const FixedFormat fmt{p.fixed_hi_scale, p.fixed_lo_scale, p.fixed_limit, p.fixed_lo_bits};
                const int64_t numel = int64_t(p.batch) * p.groups * N * L;
                for (int q = tid; q < 2 * kGroupChunk; q += kScanThreads) {
                    const int which = q / kGroupChunk, k = q % kGroupChunk;  // dB or dC, step in the share
                    const int t = j * kGroupChunk + k;
                    if (t >= L) continue;
                    Acc sum = Acc(0);
#pragma unroll
                    for (int c = 0; c < kChannels; ++c) sum += xch_s[parity][which][c][k];
                    const int64_t e = group_off + int64_t(n) * L + order.pos(t);
                    fixed_add(static_cast<unsigned long long*>(p.fixed_hi) + which * numel + e,
                              static_cast<unsigned*>(p.fixed_lo) + which * numel + e, sum, fmt, p.fixed_flags + which);
                }
                parity ^= 1;
            } else {
                if (rank == 0) carry_s[group][n] = s;
                atomic_add_items<kN>(static_cast<Acc*>(p.dB) + group_off + int64_t(n) * L, order, t0, p.vec_ok, dBv);
                atomic_add_items<kN>(static_cast<Acc*>(p.dC) + group_off + int64_t(n) * L, order, t0, p.vec_ok, dCv);
            }
        }

#pragma unroll
        for (int i = 0; i < kN; ++i) {
            if (p.softplus) ddt[i] *= sigmoid_(xv[i]);  // d softplus(x) / dx
            dbias_acc += ddt[i];                        // 0 past L
        }
        if (active) {
            store_items<kN>(static_cast<T*>(p.du) + row, order, t0, p.vec_ok, du);
            store_items<kN>(static_cast<T*>(p.ddelta) + row, order, t0, p.vec_ok, ddt);
        }
    }

    dD_acc = warp_sum(dD_acc);
    dbias_acc = warp_sum(dbias_acc);
    if constexpr (kDet) {
        // No barrier needed: the exchange's barrier already follows lane 0's last dA_s update.
        if (active) {
            Acc* part = static_cast<Acc*>(p.partials) + ((int64_t(b) * p.nseg + seg) * p.dim + d) * (N + 2);
            for (int n = lane; n < N; n += 32) part[n] = dA_s[warp * kMaxState + n];
            if (lane == 0) {
                part[N] = dD_acc;
                part[N + 1] = dbias_acc;
            }
        }
    } else {
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
}

// Deterministic backward: dA, dD, ddelta_bias from the per-block partials, added in a
// fixed order (batch, then segment); one thread per output element.
template <typename Acc>
__global__ void scan_partials_kernel(const ScanParams p) {
    const int N = p.dstate;
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // over (dim, N + 2)
    if (i >= int64_t(p.dim) * (N + 2)) return;
    const Acc* part = static_cast<const Acc*>(p.partials);
    const int64_t stride = int64_t(p.dim) * (N + 2);
    Acc s = Acc(0);
    for (int64_t r = 0; r < int64_t(p.batch) * p.nseg; ++r) s += part[r * stride + i];
    const int d = static_cast<int>(i / (N + 2)), k = static_cast<int>(i % (N + 2));
    Acc* dst = k < N ? static_cast<Acc*>(p.dA) + int64_t(d) * N + k
                     : static_cast<Acc*>(k == N ? p.dD : p.ddelta_bias) + d;
    *dst = s;
}

// Deterministic backward: dB and dC (in T) from their fixed-point sums (NaN throughout a
// tensor whose flag is set).
template <typename T>
__global__ void scan_fixed_to_float_kernel(const ScanParams p) {
    const int64_t numel = int64_t(p.batch) * p.groups * p.dstate * p.seqlen;
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // over dB then dC
    if (i >= 2 * numel) return;
    const int which = static_cast<int>(i / numel);
    const FixedFormat fmt{p.fixed_hi_scale, p.fixed_lo_scale, p.fixed_limit, p.fixed_lo_bits};
    const double v = p.fixed_flags[which] ? NAN
                                          : fixed_value(static_cast<const unsigned long long*>(p.fixed_hi)[i],
                                                        static_cast<const unsigned*>(p.fixed_lo)[i], fmt);
    static_cast<T*>(which == 0 ? p.dB : p.dC)[i % numel] = static_cast<T>(static_cast<acc_t<T>>(v));
}

template <typename T, bool kHasZ, bool kDet>
void launch_scan_bwd_kernels(const ScanParams& p, cudaStream_t stream) {
    using Acc = acc_t<T>;
    if (p.nchunks == 1 && !kHasZ && !kDet) {
        // A single chunk starts from the zero state, and there is no dz to compute.
        C10_CUDA_CHECK(cudaMemsetAsync(p.chunk_states, 0, size_t(p.batch) * p.dim * p.dstate * sizeof(Acc), stream));
    } else {
        launch_segment_carries<T, false, false>(p, stream);
        launch_scan_fwd_kernel<T, kHasZ, true>(p, stream);
    }
    // seg_states now switches from the states h entering each segment (read by the
    // pass above) to the adjoint s entering each segment from its end.
    launch_segment_carries<T, kHasZ, true>(p, stream);
    const unsigned rows = kDet ? unsigned(p.batch) * p.groups * p.channel_blocks : unsigned(p.batch) * p.dim;
    launch_kernel(scan_bwd_kernel<T, kHasZ, kDet>, dim3(rows, p.nseg), dim3(kScanThreads), stream, p);
    if constexpr (kDet) {
        constexpr int kThreads = 256;
        const int64_t partials = int64_t(p.dim) * (p.dstate + 2);
        launch_kernel(scan_partials_kernel<Acc>, dim3(unsigned((partials + kThreads - 1) / kThreads)),
                      dim3(kThreads), stream, p);
        const int64_t values = 2 * int64_t(p.batch) * p.groups * p.dstate * p.seqlen;
        launch_kernel(scan_fixed_to_float_kernel<T>, dim3(unsigned((values + kThreads - 1) / kThreads)),
                      dim3(kThreads), stream, p);
    }
}

template <typename T>
void scan_bwd_launch(const ScanParams& p, cudaStream_t stream) {
    const bool det = p.fixed_hi != nullptr;
    if (p.z != nullptr) {
        det ? launch_scan_bwd_kernels<T, true, true>(p, stream) : launch_scan_bwd_kernels<T, true, false>(p, stream);
    } else {
        det ? launch_scan_bwd_kernels<T, false, true>(p, stream) : launch_scan_bwd_kernels<T, false, false>(p, stream);
    }
}

}  // namespace segmamba_cuda

#define SEGMAMBA_INSTANTIATE_SCAN_BWD(T) \
    template void segmamba_cuda::scan_bwd_launch<T>(const segmamba_cuda::ScanParams&, cudaStream_t);
