// Test extension of the CUDA emulator: the CUDA backend's four ops (the same host logic,
// csrc/cuda/host_ops.h, with CPU tensors standing for device memory and a configurable
// target grid size for the segment planning), the emulator's controls, and its self-test
// kernels.
#include <stdexcept>
#include <string>

#include "cuda_emu_api.h"
#include "host_ops.h"
#include "selftest.h"

namespace {

namespace emu = segmamba_emu;
namespace py = pybind11;
using at::Tensor;

constexpr segmamba_cuda::DeviceContext kEmulated{c10::DeviceType::CPU, "a CPU tensor (the emulated device)", 0,
                                                 nullptr, true};
// An H100's: 132 SMs x kTargetBlocksPerSM.
constexpr int64_t kDefaultTargetBlocks = 132 * segmamba_cuda::kTargetBlocksPerSM;
int64_t g_target_blocks = kDefaultTargetBlocks;

struct EmuScope {
    segmamba_cuda::DeviceContext ctx;
    explicit EmuScope(const Tensor&) : ctx(kEmulated) { ctx.target_blocks = g_target_blocks; }
};

emu::Order parse_order(const std::string& name, const char* what) {
    if (name == "forward") return emu::Order::kForward;
    if (name == "reverse") return emu::Order::kReverse;
    if (name == "random") return emu::Order::kRandom;
    throw std::invalid_argument(std::string(what) + ": expected 'forward', 'reverse' or 'random', got '" + name + "'");
}

void configure(int64_t target_blocks, const std::string& thread_order, const std::string& block_order, uint64_t seed,
               bool race_check) {
    TORCH_CHECK(target_blocks >= 1, "target_blocks must be positive, got ", target_blocks);
    g_target_blocks = target_blocks;
    emu::Config c;
    c.thread_order = parse_order(thread_order, "thread_order");
    c.block_order = parse_order(block_order, "block_order");
    c.seed = seed;
    c.race_check = race_check;
    emu::set_config(c);
}

py::list launches() {
    py::list out;
    for (const emu::LaunchRecord& r : emu::take_launch_log())
        out.append(py::make_tuple(r.kernel, py::make_tuple(r.grid[0], r.grid[1], r.grid[2]),
                                  py::make_tuple(r.block[0], r.block[1], r.block[2])));
    return out;
}

Tensor checked(const Tensor& t, at::ScalarType dtype, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), name,
                " must be a contiguous CPU tensor of dtype ", dtype);
    return t;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "csrc/cuda run by the CPU emulator of csrc/emu (tests only)";
    segmamba_cuda::define_ops<EmuScope>(m, kEmulated);

    m.def("configure", &configure,
          "The grid size the segment planning aims at (SMs x 16 on a GPU) and the scheduling of threads and blocks",
          py::arg("target_blocks") = kDefaultTargetBlocks, py::arg("thread_order") = "forward", py::arg("block_order") = "forward",
          py::arg("seed") = 0, py::arg("race_check") = true);
    m.def("launches", &launches, "[(kernel, grid, block)] launched since the last call");
    m.def("race_detector_active", &emu::race_hooks_seen,
          "Whether the kernels were built with the race detector's instrumentation");

    auto st = m.def_submodule("selftest", "kernels that check the emulator itself");
    st.def("shuffle", [](const Tensor& in, int kind, int arg, int width) {
        TORCH_CHECK(in.dim() == 1 && in.is_contiguous() && in.device().is_cpu(), "in: a contiguous 1-d CPU tensor");
        Tensor out = at::empty({in.size(0)}, in.options().dtype(at::kFloat));
        const int n = static_cast<int>(in.size(0));
        if (in.scalar_type() == at::kDouble)
            emu::selftest::shuffle(in.data_ptr<double>(), out.data_ptr<float>(), kind, arg, width, n);
        else
            emu::selftest::shuffle(checked(in, at::kFloat, "in").data_ptr<float>(), out.data_ptr<float>(), kind, arg,
                                   width, n);
        return out;
    });
    st.def("order", [](int nblocks, int n) {
        Tensor threads = at::full({nblocks, n}, -1, at::kInt), blocks = at::full({nblocks}, -1, at::kInt);
        Tensor counters = at::zeros({nblocks + 1}, at::kInt);
        emu::selftest::order(nblocks, n, threads.data_ptr<int>(), blocks.data_ptr<int>(), counters.data_ptr<int>());
        return py::make_tuple(threads, blocks);
    });
    st.def("neighbour", [](const Tensor& in, bool with_barrier) {
        Tensor out = at::empty_like(checked(in, at::kFloat, "in"));
        emu::selftest::neighbour(in.data_ptr<float>(), out.data_ptr<float>(), static_cast<int>(in.numel()), with_barrier);
        return out;
    });
    st.def("early_return", &emu::selftest::early_return);
    st.def("divergent_barrier", &emu::selftest::divergent_barrier);
    st.def("uninitialised_shared", [](int n) {
        Tensor out = at::zeros({n}, at::kFloat);
        emu::selftest::uninitialised_shared(out.data_ptr<float>(), n);
        return out;
    });
    st.def("add_from_blocks", [](int nblocks, int n, bool atomic) {
        Tensor out = at::zeros({1}, at::kFloat);
        emu::selftest::add_from_blocks(out.data_ptr<float>(), nblocks, n, atomic);
        return out;
    });
    st.def("partial_shuffle", &emu::selftest::partial_shuffle);
}
