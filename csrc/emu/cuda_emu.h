// The CUDA subset that csrc/cuda uses, for the host compiler: the kernel sources are
// compiled unchanged as C++ against these declarations and run by the emulator in
// runtime.cpp (threads of a block as fibers, warps of 32 lanes, barriers that count
// arrivals, shared memory filled with NaN at every block start). Included through
// csrc/cuda/device.cuh when SEGMAMBA_EMULATE is defined; see csrc/emu/README.md.
#pragma once

#include <math.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include <c10/util/Exception.h>

#include "cuda_emu_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Every __shared__ variable lands in one ELF section, so that the runtime can fill all of
// them with NaN at each block start (__start_/__stop_ of the section) and tell shared from
// global addresses in the race detector. GCC ignores the attribute on static locals of
// templates: shared.ld moves those into the section at link time.
#define __shared__ static __attribute__((section("segmamba_emu_shared"), aligned(16)))

struct uint3 {
    unsigned x, y, z;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

using std::max;
using std::min;

inline float __expf(float x) { return expf(x); }

namespace segmamba_emu {

// Indices of the running fiber; the scheduler rewrites them at every switch.
struct ExecState {
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
};
extern ExecState g_exec;

enum ShuffleKind : int { kShflXor = 0, kShflUp = 1, kShflDown = 2, kShflIdx = 3 };
// Warp-level rendezvous: returns once all 32 lanes of the warp have arrived here.
void shuffle(int kind, unsigned mask, const void* in, void* out, unsigned size, int arg, int width);

using Entry = void (*)(void*);
// Runs every block of the grid (in the configured block order) to completion; throws
// std::runtime_error on a detected error (race, barrier divergence, ...).
void run_grid(const void* kernel, dim3 grid, dim3 block, Entry entry, void* ctx);

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
    struct Ctx {
        void (*kernel)(P...);
        std::tuple<std::decay_t<P>...> args;
    };
    Ctx ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_grid(reinterpret_cast<const void*>(kernel), grid, block,
             [](void* c) {
                 auto* x = static_cast<Ctx*>(c);
                 std::apply(x->kernel, x->args);
             },
             &ctx);
}

}  // namespace segmamba_emu

#define threadIdx (::segmamba_emu::g_exec.thread_idx)
#define blockIdx (::segmamba_emu::g_exec.block_idx)
#define blockDim (::segmamba_emu::g_exec.block_dim)
#define gridDim (::segmamba_emu::g_exec.grid_dim)

namespace segmamba_emu {
void barrier();  // the block barrier; its caller's address identifies the __syncthreads()
}
// The empty asm after the call keeps it out of tail position (so the caller's address is
// this __syncthreads(), not whatever called the function it ends) and stops the compiler
// from moving memory accesses across the barrier.
__forceinline__ void __syncthreads() {
    segmamba_emu::barrier();
    asm volatile("" ::: "memory");
}

template <typename T>
__forceinline__ T segmamba_emu_shuffle(int kind, unsigned mask, T v, int arg, int width) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
    T r;
    segmamba_emu::shuffle(kind, mask, &v, &r, sizeof(T), arg, width);
    return r;
}
template <typename T>
__forceinline__ T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return segmamba_emu_shuffle(segmamba_emu::kShflXor, mask, v, lane_mask, width);
}
template <typename T>
__forceinline__ T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return segmamba_emu_shuffle(segmamba_emu::kShflUp, mask, v, static_cast<int>(delta), width);
}
template <typename T>
__forceinline__ T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return segmamba_emu_shuffle(segmamba_emu::kShflDown, mask, v, static_cast<int>(delta), width);
}
template <typename T>
__forceinline__ T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    return segmamba_emu_shuffle(segmamba_emu::kShflIdx, mask, v, src_lane, width);
}

// Atomics run in the (uninstrumented) runtime, which tells the race detector that the
// access was atomic.
float atomicAdd(float* address, float val);
double atomicAdd(double* address, double val);
float4 atomicAdd(float4* address, float4 val);
int atomicAdd(int* address, int val);
unsigned atomicAdd(unsigned* address, unsigned val);
unsigned long long atomicAdd(unsigned long long* address, unsigned long long val);
int atomicOr(int* address, int val);

// What tests/mutation turns an atomicAdd into: the same addition as a plain read-modify-write.
template <typename T>
__forceinline__ T segmamba_emu_plain_add(T* address, T val) {
    const T old = *address;
    *address = old + val;
    return old;
}
__forceinline__ float4 segmamba_emu_plain_add(float4* address, float4 val) {
    const float4 old = *address;
    *address = {old.x + val.x, old.y + val.y, old.z + val.z, old.w + val.w};
    return old;
}

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
    do {                               \
    } while (0)
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "emulated CUDA call failed: " #expr)
