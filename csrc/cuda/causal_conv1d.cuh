// Causal depthwise conv1d, forward and backward. One block per (row, tile of
// kConvThreads * kN steps); each thread loads one 16-byte vector. The kMaxWidth - 1
// steps before the tile (and, in the backward, after it) come through shared memory.
// Steps are scan steps: the window walks the scan order (launch.h), memory is read and
// written at ScanOrder::pos. The backward's dweight and dbias are block sums added with
// float atomics, or (deterministic) stored per block and added up in a fixed order by
// conv_partials_kernel.
//   pre_t = bias + sum_k w_k x_{t-(W-1)+k},   out_t = act(pre_t)
//   dpre_t = dout_t act'(pre_t),  dx_s = sum_k w_k dpre_{s+(W-1)-k},
//   dw_k = sum_t dpre_t x_{t-(W-1)+k},  dbias = sum_t dpre_t
#pragma once

#include "common.cuh"

namespace segmamba_cuda {

constexpr int kConvHalo = kMaxWidth - 1;
constexpr int kConvWarps = kConvThreads / 32;

// The window x_{idx-kConvHalo} .. x_{idx+kN-1} of this thread: the halo from
// shared memory (xs[s] holds step t0 - kConvHalo + s), its own steps from registers.
template <int kN, typename Acc>
__device__ __forceinline__ void conv_window(const Acc* xs, const Acc (&xv)[kN], Acc (&win)[kConvHalo + kN]) {
#pragma unroll
    for (int j = 0; j < kConvHalo; ++j) win[j] = xs[threadIdx.x * kN + j];
#pragma unroll
    for (int i = 0; i < kN; ++i) win[kConvHalo + i] = xv[i];
}

// Pre-activation at the step whose window position is `pos` (its own x is win[pos]).
template <int kWidth, typename Acc, int kLen>
__device__ __forceinline__ Acc conv_pre(const Acc (&w)[kWidth], Acc bias, const Acc (&win)[kLen], int pos) {
    Acc acc = bias;
#pragma unroll
    for (int k = 0; k < kWidth; ++k) acc += w[k] * win[pos - (kWidth - 1) + k];
    return acc;
}

template <typename T, int kWidth>
__global__ void __launch_bounds__(kConvThreads) conv_fwd_kernel(const ConvParams p) {
    using Acc = acc_t<T>;
    constexpr int kN = vec_items<T>();
    constexpr int kTile = kConvThreads * kN;
    __shared__ Acc xs[kConvHalo + kTile];

    const int row = blockIdx.x / p.ntiles;  // batch * dim + channel
    const int d = row % p.dim;
    const int L = p.seqlen;
    const int t0 = (blockIdx.x % p.ntiles) * kTile;
    const int idx = t0 + threadIdx.x * kN;
    const T* x = static_cast<const T*>(p.x) + int64_t(row) * L;
    const ScanOrder order = order_of(p);

    Acc xv[kN];
    load_items<kN>(x, order, idx, p.vec_ok, xv);
#pragma unroll
    for (int i = 0; i < kN; ++i) xs[kConvHalo + threadIdx.x * kN + i] = xv[i];
    if (threadIdx.x < kConvHalo) {
        const int t = t0 - kConvHalo + int(threadIdx.x);
        xs[threadIdx.x] = t >= 0 ? static_cast<Acc>(x[order.pos(t)]) : Acc(0);
    }
    Acc w[kWidth];
#pragma unroll
    for (int k = 0; k < kWidth; ++k) w[k] = static_cast<const Acc*>(p.weight)[d * kWidth + k];
    const Acc bias = static_cast<const Acc*>(p.bias)[d];
    __syncthreads();

    Acc win[kConvHalo + kN], o[kN];
    conv_window<kN>(xs, xv, win);
#pragma unroll
    for (int i = 0; i < kN; ++i) {
        const Acc pre = conv_pre<kWidth>(w, bias, win, kConvHalo + i);
        o[i] = p.silu ? silu_(pre) : pre;
    }
    store_items<kN>(static_cast<T*>(p.out) + int64_t(row) * L, order, idx, p.vec_ok, o);
}

template <typename T, int kWidth>
__global__ void __launch_bounds__(kConvThreads) conv_bwd_kernel(const ConvParams p) {
    using Acc = acc_t<T>;
    constexpr int kN = vec_items<T>();
    constexpr int kTile = kConvThreads * kN;
    __shared__ Acc xs[kConvHalo + kTile + kConvHalo];  // steps t0 - halo .. t0 + kTile + halo - 1
    __shared__ Acc dps[kTile + kConvHalo];             // dpre at steps t0 .. t0 + kTile + halo - 1
    __shared__ Acc red_s[kConvWarps][kWidth + 1];

    const int tid = threadIdx.x;
    const int row = blockIdx.x / p.ntiles;
    const int tile = blockIdx.x % p.ntiles;
    const int d = row % p.dim;
    const int L = p.seqlen;
    const int t0 = tile * kTile;
    const int idx = t0 + tid * kN;
    const int64_t off = int64_t(row) * L;
    const T* x = static_cast<const T*>(p.x) + off;
    const T* dout = static_cast<const T*>(p.dout) + off;
    const ScanOrder order = order_of(p);

    Acc xv[kN], dov[kN];
    load_items<kN>(x, order, idx, p.vec_ok, xv);
    load_items<kN>(dout, order, idx, p.vec_ok, dov);  // 0 past L, so dpre is too
#pragma unroll
    for (int i = 0; i < kN; ++i) xs[kConvHalo + tid * kN + i] = xv[i];
    if (tid < kConvHalo) {
        const int before = t0 - kConvHalo + tid;
        xs[tid] = before >= 0 ? static_cast<Acc>(x[order.pos(before)]) : Acc(0);
        const int after = t0 + kTile + tid;
        xs[kConvHalo + kTile + tid] = after < L ? static_cast<Acc>(x[order.pos(after)]) : Acc(0);
    }
    Acc w[kWidth];
#pragma unroll
    for (int k = 0; k < kWidth; ++k) w[k] = static_cast<const Acc*>(p.weight)[d * kWidth + k];
    const Acc bias = static_cast<const Acc*>(p.bias)[d];
    __syncthreads();

    Acc win[kConvHalo + kN];
    conv_window<kN>(xs, xv, win);
    Acc dw[kWidth], db = Acc(0);
#pragma unroll
    for (int k = 0; k < kWidth; ++k) dw[k] = Acc(0);
#pragma unroll
    for (int i = 0; i < kN; ++i) {
        const Acc pre = conv_pre<kWidth>(w, bias, win, kConvHalo + i);
        const Acc dp = p.silu ? dov[i] * dsilu_(pre) : dov[i];
        dps[tid * kN + i] = dp;
        db += dp;
#pragma unroll
        for (int k = 0; k < kWidth; ++k) dw[k] += dp * win[kConvHalo + i - (kWidth - 1) + k];
    }
    if (tid < kConvHalo) {
        // dpre of the steps just after the tile: their inputs reach back into it.
        const int t = t0 + kTile + tid;
        Acc dp = Acc(0);
        if (t < L) {
            Acc pre = bias;
#pragma unroll
            for (int k = 0; k < kWidth; ++k) pre += w[k] * xs[kConvHalo + kTile + tid - (kWidth - 1) + k];
            const Acc go = static_cast<Acc>(dout[order.pos(t)]);
            dp = p.silu ? go * dsilu_(pre) : go;
        }
        dps[kTile + tid] = dp;
    }
    __syncthreads();

    Acc dxv[kN];
#pragma unroll
    for (int i = 0; i < kN; ++i) {
        Acc acc = Acc(0);
#pragma unroll
        for (int k = 0; k < kWidth; ++k) acc += w[k] * dps[tid * kN + i + (kWidth - 1) - k];
        dxv[i] = acc;
    }
    store_items<kN>(static_cast<T*>(p.dx) + off, order, idx, p.vec_ok, dxv);

    const int lane = tid & 31, warp = tid >> 5;
#pragma unroll
    for (int k = 0; k < kWidth; ++k) dw[k] = warp_sum(dw[k]);
    db = warp_sum(db);
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < kWidth; ++k) red_s[warp][k] = dw[k];
        red_s[warp][kWidth] = db;
    }
    __syncthreads();
    if (tid <= kWidth) {
        Acc s = Acc(0);
#pragma unroll
        for (int wi = 0; wi < kConvWarps; ++wi) s += red_s[wi][tid];
        if (p.partials != nullptr) {
            const int b = row / p.dim;
            static_cast<Acc*>(p.partials)[((int64_t(b) * p.ntiles + tile) * p.dim + d) * (kWidth + 1) + tid] = s;
        } else {
            Acc* dst = tid < kWidth ? static_cast<Acc*>(p.dweight) + d * kWidth + tid : static_cast<Acc*>(p.dbias) + d;
            atomicAdd(dst, s);
        }
    }
}

// Deterministic backward: dweight and dbias from the per-block partials, added in a fixed
// order (batch, then tile); one thread per output element.
template <typename Acc>
__global__ void conv_partials_kernel(const ConvParams p) {
    const int W = p.width;
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // over (dim, W + 1)
    if (i >= int64_t(p.dim) * (W + 1)) return;
    const Acc* part = static_cast<const Acc*>(p.partials);
    const int64_t stride = int64_t(p.dim) * (W + 1);
    Acc s = Acc(0);
    for (int64_t r = 0; r < int64_t(p.batch) * p.ntiles; ++r) s += part[r * stride + i];
    const int d = static_cast<int>(i / (W + 1)), k = static_cast<int>(i % (W + 1));
    *(k < W ? static_cast<Acc*>(p.dweight) + int64_t(d) * W + k : static_cast<Acc*>(p.dbias) + d) = s;
}

template <typename T, template <typename, int> class Launch>
void dispatch_width(const ConvParams& p, cudaStream_t stream) {
    switch (p.width) {
        case 2: Launch<T, 2>::run(p, stream); break;
        case 3: Launch<T, 3>::run(p, stream); break;
        case 4: Launch<T, 4>::run(p, stream); break;
        default: TORCH_CHECK(false, "causal_conv1d (cuda): width must be 2, 3 or 4, got ", p.width);
    }
}

template <typename T, int kWidth>
struct ConvFwd {
    static void run(const ConvParams& p, cudaStream_t stream) {
        launch_kernel(conv_fwd_kernel<T, kWidth>, dim3(p.batch * p.dim * p.ntiles), dim3(kConvThreads), stream, p);
    }
};

template <typename T, int kWidth>
struct ConvBwd {
    static void run(const ConvParams& p, cudaStream_t stream) {
        launch_kernel(conv_bwd_kernel<T, kWidth>, dim3(p.batch * p.dim * p.ntiles), dim3(kConvThreads), stream, p);
        if (p.partials != nullptr) {
            constexpr int kThreads = 256;
            const int64_t n = int64_t(p.dim) * (kWidth + 1);
            launch_kernel(conv_partials_kernel<acc_t<T>>, dim3(unsigned((n + kThreads - 1) / kThreads)),
                          dim3(kThreads), stream, p);
        }
    }
};

template <typename T>
void conv_fwd_launch(const ConvParams& p, cudaStream_t stream) { dispatch_width<T, ConvFwd>(p, stream); }

template <typename T>
void conv_bwd_launch(const ConvParams& p, cudaStream_t stream) { dispatch_width<T, ConvBwd>(p, stream); }

}  // namespace segmamba_cuda

#define SEGMAMBA_INSTANTIATE_CONV(T)                                                                    \
    template void segmamba_cuda::conv_fwd_launch<T>(const segmamba_cuda::ConvParams&, cudaStream_t); \
    template void segmamba_cuda::conv_bwd_launch<T>(const segmamba_cuda::ConvParams&, cudaStream_t);
