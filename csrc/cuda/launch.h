// Host <-> device interface of the CUDA backend: launch parameters and the
// launchers, one explicit instantiation per I/O dtype in the *_{dtype}.cu files.
// Plain C++ so that bindings.cpp (compiled by the host compiler) can include it.
#pragma once

#include <cstdint>

#ifdef SEGMAMBA_EMULATE
#include "cuda_emu_api.h"  // csrc/emu: the CPU emulator's stand-ins for the CUDA runtime types
#else
#include <cuda_runtime_api.h>
#endif

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
//
// Scan order (docs/design.md §3): scan step t reads and writes memory position
// m(t) = T(R(t)), R(t) = L - 1 - t if reverse, T(s) = (s % S) * (L / S) + s / S with S = slices
// (S divides L; S = 1 is the identity). Chunks, segments and states are in scan steps.
constexpr int kTargetBlocksPerSM = 16;

// The deterministic scan backward gives each warp one channel: a block holds this many
// channels of one group and sums their dB/dC terms in a fixed order before adding them,
// order-independently, to fixed-point sums (common.cuh: fixed_add).
constexpr int kDetChannels = kScanThreads / 32;
constexpr int kFixedFracBits = 52;  // resolution 2^-52 of those sums

struct ScanParams {
    int batch, dim, groups, dstate, seqlen, nchunks;
    int nseg, chunks_per_seg;
    bool softplus;
    bool vec_ok;  // every I/O pointer 16-byte aligned and seqlen a multiple of vec_items<T>()
    bool reverse;
    int slices;
    const void *u, *delta, *A, *B, *C, *D, *z, *delta_bias, *dout;
    void *out, *last_state;                       // forward
    void *seg_maps;      // scratch (batch, dim, nseg, N) affine maps (a, b), when nseg > 1
    void *seg_states;    // scratch (batch, dim, nseg, N): carry into each segment, when nseg > 1
    // Backward scratch (batch, dim, nchunks * states_per_chunk, N): the state at the start of
    // every chunk, or (deterministic) of every warp's share of a chunk.
    void *chunk_states;
    int states_per_chunk;
    void *du, *ddelta, *dz, *dA, *dB, *dC, *dD, *ddelta_bias;  // backward; dA..ddelta_bias zeroed
    // Deterministic backward (else null): dB and dC (p.dB, p.dC) are then in T, written once
    // from their fixed-point sums (common.cuh: fixed_add).
    void *partials;       // (batch * nseg, dim, N + 2): each block's dA, dD, ddelta_bias, summed in a fixed order
    void *fixed_hi;       // (2, B.numel()) u64, zeroed: the high parts of the dB and dC sums
    void *fixed_lo;       // (2, B.numel()) u32, zeroed: the low parts
    int *fixed_flags;     // 2 ints, zeroed: set when a dB (dC) term is not finite or beyond the format's limit
    double fixed_hi_scale, fixed_lo_scale, fixed_limit;  // FixedFormat
    int fixed_lo_bits;
    int channel_blocks;   // blocks per group: ceil((dim / groups) / kDetChannels), the terms per element
};

struct ConvParams {
    int batch, dim, seqlen, width, ntiles;
    bool silu;
    bool vec_ok;
    bool reverse;
    int slices;
    const void *x, *weight, *bias, *dout;
    void *out;                  // forward
    void *dx, *dweight, *dbias;  // backward; dweight and dbias zeroed
    void *partials;  // deterministic backward: (batch * ntiles, dim, width + 1) per-block dweight, dbias; else null
};

template <typename T> void scan_fwd_launch(const ScanParams& p, cudaStream_t stream);
template <typename T> void scan_bwd_launch(const ScanParams& p, cudaStream_t stream);
template <typename T> void conv_fwd_launch(const ConvParams& p, cudaStream_t stream);
template <typename T> void conv_bwd_launch(const ConvParams& p, cudaStream_t stream);

}  // namespace segmamba_cuda
