// Python entry points of the CUDA backend (contract: segmamba_kernels/dispatch.py).
// Checks what the kernels rely on, allocates outputs, picks the dtype instantiation
// and launches on the current stream of the inputs' device.
#include <algorithm>
#include <climits>
#include <tuple>
#include <vector>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
// ATen + torch's pybind casters instead of torch/extension.h: a third less compile time.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include "launch.h"

namespace segmamba_cuda {
namespace {

using at::Tensor;

at::ScalarType acc_dtype(at::ScalarType io) { return io == at::kDouble ? at::kDouble : at::kFloat; }

void check_io_dtype(const char* op, const Tensor& t) {
    const auto st = t.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
                " (cuda backend): expected dtype float32, float16, bfloat16 or float64, got ", st);
}

void check_tensor(const char* op, const char* name, const Tensor& t, const Tensor& ref, at::ScalarType dtype,
                  at::IntArrayRef shape) {
    TORCH_CHECK(t.defined(), op, " (cuda backend): ", name, " is undefined");
    TORCH_CHECK(t.is_cuda(), op, " (cuda backend): ", name, " must be a CUDA tensor, got one on ", t.device());
    TORCH_CHECK(t.device() == ref.device(), op, " (cuda backend): ", name, " is on ", t.device(),
                " but the first input is on ", ref.device());
    TORCH_CHECK(t.scalar_type() == dtype, op, " (cuda backend): ", name, " must have dtype ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.sizes() == shape, op, " (cuda backend): ", name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, " (cuda backend): ", name, " must be contiguous");
}

// Splits the chunks into segments (one block each) until the grid has about
// kTargetBlocksPerSM blocks per SM, then allocates the scratch the segment pass needs.
void plan_segments(ScanParams& p, const Tensor& like, std::vector<Tensor>& scratch) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, like.get_device()));
    const int64_t rows = int64_t(p.batch) * p.dim;
    const int64_t wanted = (int64_t(sms) * kTargetBlocksPerSM + rows - 1) / rows;
    const int64_t nseg = std::max<int64_t>(1, std::min<int64_t>({wanted, p.nchunks, 65535}));
    p.chunks_per_seg = static_cast<int>((p.nchunks + nseg - 1) / nseg);
    p.nseg = (p.nchunks + p.chunks_per_seg - 1) / p.chunks_per_seg;
    if (p.nseg > 1) {
        scratch.push_back(at::empty({p.batch, p.dim, p.nseg, p.dstate, 2}, like.options()));
        scratch.push_back(at::empty({p.batch, p.dim, p.nseg, p.dstate}, like.options()));
        p.seg_maps = scratch[0].data_ptr();
        p.seg_states = scratch[1].data_ptr();
    }
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Calls f(T{}) with T the C++ type of the I/O dtype.
template <typename F>
void dispatch_io(at::ScalarType st, F&& f) {
    switch (st) {
        case at::kFloat: f(float{}); break;
        case at::kHalf: f(c10::Half{}); break;
        case at::kBFloat16: f(c10::BFloat16{}); break;
        case at::kDouble: f(double{}); break;
        default: TORCH_CHECK(false, "segmamba cuda backend: unsupported dtype ", st);
    }
}

int vec_items_of(at::ScalarType st) { return 16 / static_cast<int>(c10::elementSize(st)); }

// Checks the scan arguments and fills everything of ScanParams but the outputs.
ScanParams scan_params(const char* op, const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                       const Tensor& C, const Tensor& D, const c10::optional<Tensor>& z,
                       const Tensor& delta_bias, bool delta_softplus, const Tensor* dout) {
    TORCH_CHECK(u.defined() && u.dim() == 3, op, " (cuda backend): u must be (batch, dim, L), got ",
                u.defined() ? u.sizes() : at::IntArrayRef{});
    TORCH_CHECK(u.is_cuda(), op, " (cuda backend): u must be a CUDA tensor, got one on ", u.device());
    check_io_dtype(op, u);
    const auto io = u.scalar_type(), acc = acc_dtype(io);
    const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
    TORCH_CHECK(A.defined() && A.dim() == 2, op, " (cuda backend): A must be (dim, N)");
    TORCH_CHECK(B.defined() && B.dim() == 4, op, " (cuda backend): B must be (batch, groups, N, L), got ",
                B.defined() ? B.sizes() : at::IntArrayRef{});
    const int64_t N = A.size(1), groups = B.size(1);
    check_tensor(op, "u", u, u, io, {batch, dim, L});
    check_tensor(op, "delta", delta, u, io, {batch, dim, L});
    check_tensor(op, "A", A, u, acc, {dim, N});
    check_tensor(op, "B", B, u, io, {batch, groups, N, L});
    check_tensor(op, "C", C, u, io, {batch, groups, N, L});
    check_tensor(op, "D", D, u, acc, {dim});
    check_tensor(op, "delta_bias", delta_bias, u, acc, {dim});
    if (z.has_value()) check_tensor(op, "z", *z, u, io, {batch, dim, L});
    if (dout != nullptr) check_tensor(op, "dout", *dout, u, io, {batch, dim, L});
    TORCH_CHECK(N >= 1 && N <= kMaxState, op, " (cuda backend): the state size N (A.shape[1]) must be in [1, ",
                kMaxState, "], got ", N);
    TORCH_CHECK(groups >= 1 && dim % groups == 0, op, " (cuda backend): groups (B.shape[1]) must divide dim = ", dim,
                ", got ", groups);
    // Step indices are int32 and may run one chunk past L.
    TORCH_CHECK(L <= INT_MAX - 4096, op, " (cuda backend): sequence length L = ", L, " exceeds the limit ",
                INT_MAX - 4096);
    TORCH_CHECK(batch * dim <= INT_MAX, op, " (cuda backend): batch * dim = ", batch * dim,
                " exceeds the grid limit ", INT_MAX);

    const int chunk = kScanThreads * vec_items_of(io);
    ScanParams p{};
    p.batch = static_cast<int>(batch);
    p.dim = static_cast<int>(dim);
    p.groups = static_cast<int>(groups);
    p.dstate = static_cast<int>(N);
    p.seqlen = static_cast<int>(L);
    p.nchunks = static_cast<int>((L + chunk - 1) / chunk);
    p.softplus = delta_softplus;
    std::vector<const Tensor*> io_tensors{&u, &delta, &B, &C};
    if (z.has_value()) io_tensors.push_back(&*z);
    if (dout != nullptr) io_tensors.push_back(dout);
    p.vec_ok = L % vec_items_of(io) == 0;
    for (const Tensor* t : io_tensors) p.vec_ok = p.vec_ok && aligned16(*t);
    p.u = u.data_ptr();
    p.delta = delta.data_ptr();
    p.A = A.data_ptr();
    p.B = B.data_ptr();
    p.C = C.data_ptr();
    p.D = D.data_ptr();
    p.z = z.has_value() ? z->data_ptr() : nullptr;
    p.delta_bias = delta_bias.data_ptr();
    p.dout = dout != nullptr ? dout->data_ptr() : nullptr;
    return p;
}

std::tuple<Tensor, Tensor> selective_scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A,
                                              const Tensor& B, const Tensor& C, const Tensor& D,
                                              const c10::optional<Tensor>& z, const Tensor& delta_bias,
                                              bool delta_softplus) {
    ScanParams p = scan_params("selective_scan_fwd", u, delta, A, B, C, D, z, delta_bias, delta_softplus, nullptr);
    const c10::cuda::CUDAGuard guard(u.device());
    Tensor out = at::empty_like(u);
    Tensor last_state = at::zeros({u.size(0), u.size(1), A.size(1)}, u.options().dtype(A.scalar_type()));
    if (u.numel() == 0) return {out, last_state};
    p.out = out.data_ptr();
    p.last_state = last_state.data_ptr();
    std::vector<Tensor> scratch;
    plan_segments(p, last_state, scratch);
    p.vec_ok = p.vec_ok && aligned16(out);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_io(u.scalar_type(), [&](auto tag) { scan_fwd_launch<decltype(tag)>(p, stream); });
    return {out, last_state};
}

std::vector<Tensor> selective_scan_bwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                       const Tensor& C, const Tensor& D, const c10::optional<Tensor>& z,
                                       const Tensor& delta_bias, bool delta_softplus, const Tensor& dout) {
    ScanParams p = scan_params("selective_scan_bwd", u, delta, A, B, C, D, z, delta_bias, delta_softplus, &dout);
    const c10::cuda::CUDAGuard guard(u.device());
    const auto io = u.scalar_type(), acc = acc_dtype(io);
    Tensor du = at::empty_like(u), ddelta = at::empty_like(delta);
    Tensor dz = z.has_value() ? at::empty_like(*z) : at::empty({0}, u.options());
    Tensor dA = at::zeros_like(A), dD = at::zeros_like(D), ddelta_bias = at::zeros_like(delta_bias);
    // dB/dC collect every channel of a group through atomics: float buffers, cast at the end.
    Tensor dB = at::zeros(B.sizes(), B.options().dtype(acc)), dC = at::zeros(C.sizes(), C.options().dtype(acc));
    if (u.numel() > 0) {
        Tensor chunk_states = at::empty({u.size(0), u.size(1), p.nchunks, A.size(1)}, A.options());
        p.du = du.data_ptr();
        p.ddelta = ddelta.data_ptr();
        p.dz = z.has_value() ? dz.data_ptr() : nullptr;
        p.dA = dA.data_ptr();
        p.dB = dB.data_ptr();
        p.dC = dC.data_ptr();
        p.dD = dD.data_ptr();
        p.ddelta_bias = ddelta_bias.data_ptr();
        p.chunk_states = chunk_states.data_ptr();
        std::vector<Tensor> scratch;
        plan_segments(p, chunk_states, scratch);
        for (const Tensor* t : {&du, &ddelta, &dB, &dC}) p.vec_ok = p.vec_ok && aligned16(*t);
        if (z.has_value()) p.vec_ok = p.vec_ok && aligned16(dz);
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
        dispatch_io(io, [&](auto tag) { scan_bwd_launch<decltype(tag)>(p, stream); });
    }
    return {du, ddelta, dA, dB.to(io), dC.to(io), dD, dz, ddelta_bias};
}

ConvParams conv_params(const char* op, const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu,
                       const Tensor* dout) {
    TORCH_CHECK(x.defined() && x.dim() == 3, op, " (cuda backend): x must be (batch, dim, L), got ",
                x.defined() ? x.sizes() : at::IntArrayRef{});
    TORCH_CHECK(x.is_cuda(), op, " (cuda backend): x must be a CUDA tensor, got one on ", x.device());
    check_io_dtype(op, x);
    const auto io = x.scalar_type(), acc = acc_dtype(io);
    const int64_t batch = x.size(0), dim = x.size(1), L = x.size(2);
    TORCH_CHECK(weight.defined() && weight.dim() == 2, op, " (cuda backend): weight must be (dim, width)");
    const int64_t width = weight.size(1);
    check_tensor(op, "weight", weight, x, acc, {dim, width});
    check_tensor(op, "bias", bias, x, acc, {dim});
    check_tensor(op, "x", x, x, io, {batch, dim, L});
    if (dout != nullptr) check_tensor(op, "dout", *dout, x, io, {batch, dim, L});
    TORCH_CHECK(width >= 2 && width <= kMaxWidth, op, " (cuda backend): width (weight.shape[1]) must be in [2, ",
                kMaxWidth, "], got ", width);
    const int tile = kConvThreads * vec_items_of(io);
    const int64_t ntiles = (L + tile - 1) / tile;
    TORCH_CHECK(L <= INT_MAX - 2 * tile, op, " (cuda backend): sequence length L = ", L, " exceeds the limit ",
                INT_MAX - 2 * tile);
    TORCH_CHECK(batch * dim * ntiles <= INT_MAX, op, " (cuda backend): batch * dim * ceil(L / ", tile, ") = ",
                batch * dim * ntiles, " exceeds the grid limit ", INT_MAX);
    ConvParams p{};
    p.batch = static_cast<int>(batch);
    p.dim = static_cast<int>(dim);
    p.seqlen = static_cast<int>(L);
    p.width = static_cast<int>(width);
    p.ntiles = static_cast<int>(ntiles);
    p.silu = silu;
    p.vec_ok = L % vec_items_of(io) == 0 && aligned16(x) && (dout == nullptr || aligned16(*dout));
    p.x = x.data_ptr();
    p.weight = weight.data_ptr();
    p.bias = bias.data_ptr();
    p.dout = dout != nullptr ? dout->data_ptr() : nullptr;
    return p;
}

Tensor causal_conv1d_fwd(const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu) {
    ConvParams p = conv_params("causal_conv1d_fwd", x, weight, bias, silu, nullptr);
    const c10::cuda::CUDAGuard guard(x.device());
    Tensor out = at::empty_like(x);
    if (x.numel() == 0) return out;
    p.out = out.data_ptr();
    p.vec_ok = p.vec_ok && aligned16(out);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_io(x.scalar_type(), [&](auto tag) { conv_fwd_launch<decltype(tag)>(p, stream); });
    return out;
}

std::tuple<Tensor, Tensor, Tensor> causal_conv1d_bwd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                     bool silu, const Tensor& dout) {
    ConvParams p = conv_params("causal_conv1d_bwd", x, weight, bias, silu, &dout);
    const c10::cuda::CUDAGuard guard(x.device());
    Tensor dx = at::empty_like(x), dweight = at::zeros_like(weight), dbias = at::zeros_like(bias);
    if (x.numel() == 0) return {dx, dweight, dbias};
    p.dx = dx.data_ptr();
    p.dweight = dweight.data_ptr();
    p.dbias = dbias.data_ptr();
    p.vec_ok = p.vec_ok && aligned16(dx);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_io(x.scalar_type(), [&](auto tag) { conv_bwd_launch<decltype(tag)>(p, stream); });
    return {dx, dweight, dbias};
}

}  // namespace
}  // namespace segmamba_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    namespace sc = segmamba_cuda;
    m.doc() = "segmamba CUDA kernels: selective scan and causal conv1d, forward and backward";
    m.def("selective_scan_fwd", &sc::selective_scan_fwd, "Selective scan forward -> (out, last_state)",
          py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
          py::arg("delta_bias"), py::arg("delta_softplus"));
    m.def("selective_scan_bwd", &sc::selective_scan_bwd,
          "Selective scan backward -> [du, ddelta, dA, dB, dC, dD, dz (empty without z), ddelta_bias]",
          py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
          py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("dout"));
    m.def("causal_conv1d_fwd", &sc::causal_conv1d_fwd, "Causal depthwise conv1d forward", py::arg("x"),
          py::arg("weight"), py::arg("bias"), py::arg("silu"));
    m.def("causal_conv1d_bwd", &sc::causal_conv1d_bwd, "Causal depthwise conv1d backward -> (dx, dweight, dbias)",
          py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("silu"), py::arg("dout"));
}
