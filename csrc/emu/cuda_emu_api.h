// Host-side API of the CUDA emulator: the few runtime types csrc/cuda/launch.h needs
// (in place of <cuda_runtime_api.h>) and the controls of the emulator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = struct segmamba_emu_stream*;
enum cudaError_t : int { cudaSuccess = 0 };
cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t stream);

namespace segmamba_emu {

enum class Order : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Config {
    Order thread_order = Order::kForward;  // order of the threads of a block between two barriers
    Order block_order = Order::kForward;   // order in which the blocks of a grid run
    uint64_t seed = 0;                     // for Order::kRandom
    bool race_check = true;                // needs the kernels built with -fsanitize=thread
};
void set_config(const Config& config);
Config get_config();

struct LaunchRecord {
    std::string kernel;
    unsigned grid[3], block[3];
};
// Launches since the last call (kernel name, grid, block), oldest first.
std::vector<LaunchRecord> take_launch_log();

// Whether the race detector receives the kernels' memory accesses (true when the kernel
// translation units were compiled with -fsanitize=thread).
bool race_hooks_seen();

}  // namespace segmamba_emu
