// Small kernels that check the emulator itself (tests/test_cuda_emulated.py): shuffles,
// scheduling orders, barrier errors, NaN-filled shared memory, the race detector.
#pragma once

namespace segmamba_emu::selftest {

// out[t] = __shfl_{xor,up,down,idx}_sync(in[t], arg, width) over one block of n threads.
void shuffle(const float* in, float* out, int kind, int arg, int width, int n);
void shuffle(const double* in, float* out, int kind, int arg, int width, int n);
// thread_order[b * n + k]: the k-th thread of block b to run (first phase); block_order[k]:
// the k-th block to start. counters: nblocks + 1 zeros.
void order(int nblocks, int n, int* thread_order, int* block_order, int* counters);
// out[t] = in[(t + 1) % n] through shared memory, with or without the __syncthreads between.
void neighbour(const float* in, float* out, int n, bool with_barrier);
// Thread 0 returns early; the others wait at a __syncthreads.
void early_return(int n);
// The first warp waits at one __syncthreads, the rest at another.
void divergent_barrier(int n);
// out[t] = a shared array element nobody wrote.
void uninitialised_shared(float* out, int n);
// Every thread of every block adds 1 to *out, atomically or with a plain +=.
void add_from_blocks(float* out, int nblocks, int n, bool atomic);
// Only lanes 0..15 of each warp reach a shuffle.
void partial_shuffle(int n);

}  // namespace segmamba_emu::selftest
