// The one place that includes CUDA's own headers. With SEGMAMBA_EMULATE the same kernel
// sources compile with the host compiler against the CPU emulator in csrc/emu instead
// (tests/test_cuda_emulated.py), so everything CUDA-specific the kernels use goes through
// here: the CUDA runtime, c10's CUDA checks, and kernel launches. One rule for device code:
// its function-local statics are exactly the __shared__ variables (the emulator relies on
// it to find them, see csrc/emu/shared.ld).
#pragma once

#ifdef SEGMAMBA_EMULATE
#include "cuda_emu.h"
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launch.h"

// Hopper's 16-byte vector float atomics. The emulator takes this path too, so that its
// tests cover it (the scalar path still runs there for tails, unaligned rows and double).
#if defined(SEGMAMBA_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define SEGMAMBA_VEC_ATOMICS 1
#else
#define SEGMAMBA_VEC_ATOMICS 0
#endif

namespace segmamba_cuda {

// kernel<<<grid, block, 0, stream>>>(args...) plus the launch check.
template <typename... P, typename... A>
void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A&&... args) {
#ifdef SEGMAMBA_EMULATE
    (void)stream;
    segmamba_emu::launch(kernel, grid, block, std::forward<A>(args)...);
#else
    kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace segmamba_cuda
