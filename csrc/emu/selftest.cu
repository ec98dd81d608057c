// Kernels that check the emulator itself; see selftest.h. Compiled like the kernels of
// csrc/cuda (instrumented for the race detector).
#include "selftest.h"

#include "cuda_emu.h"

namespace segmamba_emu::selftest {

// Not in an anonymous namespace: exported symbols, so that reports name the kernels.

template <typename T>
__global__ void shuffle_kernel(const T* in, float* out, int kind, int arg, int width) {
    const int t = threadIdx.x;
    const T v = in[t];
    T r;
    switch (kind) {
        case kShflXor: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
        case kShflUp: r = __shfl_up_sync(0xffffffffu, v, arg, width); break;
        case kShflDown: r = __shfl_down_sync(0xffffffffu, v, arg, width); break;
        default: r = __shfl_sync(0xffffffffu, v, arg, width); break;
    }
    out[t] = static_cast<float>(r);
}

__global__ void order_kernel(int* thread_order, int* block_order, int* counters) {
    const int b = blockIdx.x, n = blockDim.x;
    thread_order[b * n + atomicAdd(&counters[b], 1)] = threadIdx.x;
    if (threadIdx.x == 0) block_order[atomicAdd(&counters[gridDim.x], 1)] = b;
}

__global__ void neighbour_kernel(const float* in, float* out, bool with_barrier) {
    __shared__ float s[1024];
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = in[t];
    if (with_barrier) __syncthreads();
    out[t] = s[(t + 1) % n];
}

__global__ void early_return_kernel() {
    if (threadIdx.x == 0) return;
    __syncthreads();
}

// Two functions with different bodies, so that the compiler cannot merge the two barriers.
__attribute__((noinline)) void first_barrier() {
    asm volatile("# first barrier" ::: "memory");
    __syncthreads();
}
__attribute__((noinline)) void second_barrier() {
    asm volatile("# second barrier" ::: "memory");
    __syncthreads();
}

__global__ void divergent_barrier_kernel() {
    if (threadIdx.x < 32)
        first_barrier();
    else
        second_barrier();
}

__global__ void uninitialised_shared_kernel(float* out) {
    __shared__ float s[1024];
    out[threadIdx.x] = s[threadIdx.x];
}

__global__ void add_kernel(float* out, bool atomic) {
    if (atomic)
        atomicAdd(out, 1.0f);
    else
        *out += 1.0f;
}

__global__ void partial_shuffle_kernel() {
    if ((threadIdx.x & 31) < 16) (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

void shuffle(const float* in, float* out, int kind, int arg, int width, int n) {
    launch(shuffle_kernel<float>, dim3(1), dim3(n), in, out, kind, arg, width);
}
void shuffle(const double* in, float* out, int kind, int arg, int width, int n) {
    launch(shuffle_kernel<double>, dim3(1), dim3(n), in, out, kind, arg, width);
}
void order(int nblocks, int n, int* thread_order, int* block_order, int* counters) {
    launch(order_kernel, dim3(nblocks), dim3(n), thread_order, block_order, counters);
}
void neighbour(const float* in, float* out, int n, bool with_barrier) {
    launch(neighbour_kernel, dim3(1), dim3(n), in, out, with_barrier);
}
void early_return(int n) { launch(early_return_kernel, dim3(1), dim3(n)); }
void divergent_barrier(int n) { launch(divergent_barrier_kernel, dim3(1), dim3(n)); }
void uninitialised_shared(float* out, int n) { launch(uninitialised_shared_kernel, dim3(1), dim3(n), out); }
void add_from_blocks(float* out, int nblocks, int n, bool atomic) {
    launch(add_kernel, dim3(nblocks), dim3(n), out, atomic);
}
void partial_shuffle(int n) { launch(partial_shuffle_kernel, dim3(1), dim3(n)); }

}  // namespace segmamba_emu::selftest
