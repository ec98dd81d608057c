// Host <-> device interface of the CUDA backend: launch parameters and the
// launchers, one explicit instantiation per I/O dtype in the *_{dtype}.cu files.
// Plain C++ so that bindings.cpp (compiled by the host compiler) can include it.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace segmamba_cuda {

constexpr int kScanThreads = 128;
constexpr int kMaxState = 256;  // N above this is refused on the host
constexpr int kConvThreads = 128;
constexpr int kMaxWidth = 4;

// Each thread owns one 16-byte vector of the I/O dtype: 4 fp32, 8 bf16/fp16, 2 fp64 items.
template <typename T>
constexpr int vec_items() { return 16 / static_cast<int>(sizeof(T)); }
template <typename T>
constexpr int scan_chunk_len() { return kScanThreads * vec_items<T>(); }
template <typename T>
constexpr int conv_tile_len() { return kConvThreads * vec_items<T>(); }

// All tensors contiguous. I/O tensors (u, delta, B, C, z, dout, out, du, ddelta, dz) are in T;
// every other pointer is in the accumulation type (double for T = double, else float).
// Long sequences are split into nseg segments of chunks_per_seg chunks, one block per
// (batch, channel, segment), so that batch * dim need not fill the GPU on its own. The
// segments' maps (state at end as an affine function of state at start) are scanned
// across segments first; with nseg == 1 that pass is skipped.
constexpr int kTargetBlocksPerSM = 16;

struct ScanParams {
    int batch, dim, groups, dstate, seqlen, nchunks;
    int nseg, chunks_per_seg;
    bool softplus;
    bool vec_ok;  // every I/O pointer 16-byte aligned and seqlen a multiple of vec_items<T>()
    const void *u, *delta, *A, *B, *C, *D, *z, *delta_bias, *dout;
    void *out, *last_state;                       // forward
    void *seg_maps;      // scratch (batch, dim, nseg, N) affine maps (a, b), when nseg > 1
    void *seg_states;    // scratch (batch, dim, nseg, N): carry into each segment, when nseg > 1
    void *chunk_states;  // backward scratch (batch, dim, nchunks, N): state at each chunk start
    void *du, *ddelta, *dz, *dA, *dB, *dC, *dD, *ddelta_bias;  // backward; dA..ddelta_bias zeroed
};

struct ConvParams {
    int batch, dim, seqlen, width, ntiles;
    bool silu;
    bool vec_ok;
    const void *x, *weight, *bias, *dout;
    void *out;                  // forward
    void *dx, *dweight, *dbias;  // backward; dweight and dbias zeroed
};

template <typename T> void scan_fwd_launch(const ScanParams& p, cudaStream_t stream);
template <typename T> void scan_bwd_launch(const ScanParams& p, cudaStream_t stream);
template <typename T> void conv_fwd_launch(const ConvParams& p, cudaStream_t stream);
template <typename T> void conv_bwd_launch(const ConvParams& p, cudaStream_t stream);

}  // namespace segmamba_cuda
