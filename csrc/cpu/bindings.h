// Torch glue of the CPU backend: argument checks, dtype dispatch, output
// allocation, and the Python module (contract: segmamba_kernels/dispatch.py).
// Included once per ISA level by isa/<level>.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "conv.h"
#include "scan.h"

namespace segmamba {

using at::Tensor;

// Calls f(IO{}, T{}) with the storage type of `st` and its compute type.
template <class F>
void dispatch_io(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}, float{}); break;
    case at::kHalf: f(c10::Half{}, float{}); break;
    default: TORCH_CHECK(false, what, ": expected dtype float32, float64, bfloat16 or float16, got ", st);
  }
}

inline at::ScalarType compute_dtype(at::ScalarType io) { return io == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_tensor(const Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

template <class T, class IO>
scan::Problem<T, IO> scan_problem(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                  const Tensor& C, const Tensor& D, const std::optional<Tensor>& z,
                                  const Tensor& delta_bias, bool delta_softplus) {
  TORCH_CHECK(u.dim() == 3, "u: expected (batch, dim, L), got shape ", u.sizes());
  TORCH_CHECK(A.dim() == 2, "A: expected (dim, N), got shape ", A.sizes());
  TORCH_CHECK(B.dim() == 4, "B: expected (batch, groups, N, L), got shape ", B.sizes());
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1), groups = B.size(1);
  TORCH_CHECK(groups >= 1 && dim % groups == 0, "B: groups must divide dim=", dim, ", got groups=", groups);
  const auto io = u.scalar_type(), cdt = compute_dtype(io);
  check_tensor(u, "u", {batch, dim, L}, io);
  check_tensor(delta, "delta", {batch, dim, L}, io);
  check_tensor(A, "A", {dim, N}, cdt);
  check_tensor(B, "B", {batch, groups, N, L}, io);
  check_tensor(C, "C", {batch, groups, N, L}, io);
  check_tensor(D, "D", {dim}, cdt);
  check_tensor(delta_bias, "delta_bias", {dim}, cdt);
  if (z) check_tensor(*z, "z", {batch, dim, L}, io);
  scan::Problem<T, IO> p;
  p.u = u.data_ptr<IO>();
  p.delta = delta.data_ptr<IO>();
  p.B = B.data_ptr<IO>();
  p.C = C.data_ptr<IO>();
  p.z = z ? z->data_ptr<IO>() : nullptr;
  p.A = A.data_ptr<T>();
  p.D = D.data_ptr<T>();
  p.delta_bias = delta_bias.data_ptr<T>();
  p.batch = batch;
  p.dim = dim;
  p.L = L;
  p.N = N;
  p.groups = groups;
  p.softplus = delta_softplus;
  return p;
}

// The states the forward saves for the backward: (batch, chunks, N, dim) in the compute dtype.
inline std::vector<int64_t> chunk_states_shape(const Tensor& u, const Tensor& A) {
  return {u.size(0), (u.size(2) + scan::kChunk - 1) / scan::kChunk, A.size(1), u.size(1)};
}

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A,
                                                      const Tensor& B, const Tensor& C, const Tensor& D,
                                                      const std::optional<Tensor>& z, const Tensor& delta_bias,
                                                      bool delta_softplus, bool save_chunk_states) {
  Tensor out = at::empty_like(u);
  Tensor last_state = at::empty({u.size(0), u.size(1), A.size(1)}, A.options());
  Tensor chunk_states =
      at::empty(save_chunk_states ? chunk_states_shape(u, A) : std::vector<int64_t>{0}, A.options());
  dispatch_io(u.scalar_type(), "u", [&](auto io, auto ct) {
    using IO = decltype(io);
    using T = decltype(ct);
    const auto p = scan_problem<T, IO>(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
    scan::forward(p, out.data_ptr<IO>(), last_state.data_ptr<T>(),
                  save_chunk_states ? chunk_states.data_ptr<T>() : nullptr, at::get_num_threads());
  });
  return {out, last_state, chunk_states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd(
    const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C, const Tensor& D,
    const std::optional<Tensor>& z, const Tensor& delta_bias, bool delta_softplus, const Tensor& dout,
    const Tensor& chunk_states) {
  check_tensor(dout, "dout", u.sizes(), u.scalar_type());
  check_tensor(chunk_states, "chunk_states", chunk_states_shape(u, A), A.scalar_type());
  Tensor du = at::empty_like(u), ddelta = at::empty_like(u), dB = at::empty_like(B), dC = at::empty_like(C);
  Tensor dz = z ? at::empty_like(*z) : at::empty({0}, u.options());
  Tensor dA = at::empty_like(A), dD = at::empty_like(D), ddelta_bias = at::empty_like(delta_bias);
  dispatch_io(u.scalar_type(), "u", [&](auto io, auto ct) {
    using IO = decltype(io);
    using T = decltype(ct);
    const auto p = scan_problem<T, IO>(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
    scan::Grads<T, IO> g{du.data_ptr<IO>(), ddelta.data_ptr<IO>(), z ? dz.data_ptr<IO>() : nullptr,
                         dB.data_ptr<IO>(), dC.data_ptr<IO>(), dA.data_ptr<T>(), dD.data_ptr<T>(),
                         ddelta_bias.data_ptr<T>()};
    scan::backward(p, dout.data_ptr<IO>(), chunk_states.data_ptr<T>(), g, at::get_num_threads());
  });
  return {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias};
}

template <class T, class IO>
conv::Problem<T, IO> conv_problem(const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu) {
  TORCH_CHECK(x.dim() == 3, "x: expected (batch, dim, L), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) >= 2 && weight.size(1) <= 4,
              "weight: expected (dim, width) with width in 2..4, got shape ", weight.sizes());
  const auto cdt = compute_dtype(x.scalar_type());
  check_tensor(x, "x", x.sizes(), x.scalar_type());
  check_tensor(weight, "weight", {x.size(1), weight.size(1)}, cdt);
  check_tensor(bias, "bias", {x.size(1)}, cdt);
  return conv::Problem<T, IO>{x.data_ptr<IO>(), weight.data_ptr<T>(), bias.data_ptr<T>(),
                              x.size(0), x.size(1), x.size(2), silu};
}

Tensor causal_conv1d_fwd(const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu) {
  Tensor out = at::empty_like(x);
  dispatch_io(x.scalar_type(), "x", [&](auto io, auto ct) {
    using IO = decltype(io);
    using T = decltype(ct);
    conv::forward(conv_problem<T, IO>(x, weight, bias, silu), weight.size(1), out.data_ptr<IO>(),
                  at::get_num_threads());
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> causal_conv1d_bwd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                     bool silu, const Tensor& dout) {
  check_tensor(dout, "dout", x.sizes(), x.scalar_type());
  Tensor dx = at::empty_like(x), dweight = at::empty_like(weight), dbias = at::empty_like(bias);
  dispatch_io(x.scalar_type(), "x", [&](auto io, auto ct) {
    using IO = decltype(io);
    using T = decltype(ct);
    conv::Grads<T, IO> g{dx.data_ptr<IO>(), dweight.data_ptr<T>(), dbias.data_ptr<T>()};
    conv::backward(conv_problem<T, IO>(x, weight, bias, silu), weight.size(1), dout.data_ptr<IO>(), g,
                   at::get_num_threads());
  });
  return {dx, dweight, dbias};
}

// What this build is: for `python -m segmamba_kernels.info` and benchmarks.
py::dict info() {
  py::dict d;
  d["isa"] = SEGMAMBA_ISA_NAME;
  d["vector_bytes"] = SEGMAMBA_VEC_BYTES;
  d["float_lanes"] = simd::V<float>::W;
  d["scan_chunk"] = scan::kChunk;
  d["scan_staged_row_bytes"] = scan::kAliasingRowBytes;
  d["openmp_max_threads"] = omp_get_max_threads();
  return d;
}

}  // namespace segmamba

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "segmamba CPU kernels (" SEGMAMBA_ISA_NAME ")";
  m.def("selective_scan_fwd", &segmamba::selective_scan_fwd, "selective scan forward", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("save_chunk_states"));
  m.def("selective_scan_bwd", &segmamba::selective_scan_bwd, "selective scan backward", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("dout"), py::arg("chunk_states"));
  // Tells segmamba_kernels.ops that this backend's forward saves states for its backward, and their shape.
  m.attr("SCAN_CHUNK_STATES_STRIDE") = segmamba::scan::kChunk;
  m.def("causal_conv1d_fwd", &segmamba::causal_conv1d_fwd, "causal depthwise conv1d forward", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("silu"));
  m.def("causal_conv1d_bwd", &segmamba::causal_conv1d_bwd, "causal depthwise conv1d backward", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("silu"), py::arg("dout"));
  m.def("info", &segmamba::info, "ISA level and kernel parameters of this build");
}
