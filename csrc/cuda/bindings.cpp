// Python module of the CUDA backend: the four ops of host_ops.h on the current CUDA device
// and stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "host_ops.h"

namespace {

constexpr segmamba_cuda::DeviceContext kCuda{c10::DeviceType::CUDA, "a CUDA tensor", 0, nullptr, false};

struct CudaScope {
    c10::cuda::CUDAGuard guard;
    segmamba_cuda::DeviceContext ctx;

    explicit CudaScope(const at::Tensor& first) : guard(first.device()), ctx(kCuda) {
        int sms = 0;
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, first.get_device()));
        ctx.target_blocks = int64_t(sms) * segmamba_cuda::kTargetBlocksPerSM;
        ctx.stream = c10::cuda::getCurrentCUDAStream();
    }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "segmamba CUDA kernels: selective scan and causal conv1d, forward and backward";
    segmamba_cuda::define_ops<CudaScope>(m, kCuda);
}
