// Torch glue of the CPU backend: argument checks, dtype dispatch, output
// allocation, and the Python module (contract: segmamba_kernels/dispatch.py).
// Every function takes the scan order as `reverse` and `slices` (order.h); the backward
// functions take `deterministic`, which changes nothing here: these kernels always form every
// sum in one order whatever the thread count (scan.h: backward).
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

inline Order order_of(int64_t L, bool reverse, int64_t slices) {
  TORCH_CHECK(slices >= 1 && L % slices == 0, "slices: expected a positive divisor of L = ", L, ", got ", slices);
  return Order(L, slices, reverse);
}

inline void check_meta(const Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_tensor(const Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  check_meta(t, name, shape, dtype);
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// Outputs the kernels write: contiguous whatever the layout of the input they follow.
inline Tensor contiguous_like(const Tensor& t) { return at::empty(t.sizes(), t.options()); }

// A (batch, ..., L) input: contiguous within each batch element, any batch stride (BATCH_STRIDED_INPUTS).
template <class IO>
BatchRows<IO> batch_rows(const Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  check_meta(t, name, shape, dtype);
  TORCH_CHECK(t.size(0) == 0 || t.select(0, 0).is_contiguous(), name,
              ": expected each batch element contiguous (any batch stride), got strides ", t.strides());
  return {t.data_ptr<IO>(), t.size(0) > 1 ? t.stride(0) : 0, t.size(-1)};
}

template <class T, class IO>
scan::Problem<T, IO> scan_problem(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                  const Tensor& C, const Tensor& D, const std::optional<Tensor>& z,
                                  const Tensor& delta_bias, bool delta_softplus, bool reverse, int64_t slices) {
  TORCH_CHECK(u.dim() == 3, "u: expected (batch, dim, L), got shape ", u.sizes());
  TORCH_CHECK(A.dim() == 2, "A: expected (dim, N), got shape ", A.sizes());
  TORCH_CHECK(B.dim() == 4, "B: expected (batch, groups, N, L), got shape ", B.sizes());
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1), groups = B.size(1);
  TORCH_CHECK(groups >= 1 && dim % groups == 0, "B: groups must divide dim=", dim, ", got groups=", groups);
  const auto io = u.scalar_type(), cdt = compute_dtype(io);
  scan::Problem<T, IO> p;
  p.u = batch_rows<IO>(u, "u", {batch, dim, L}, io);
  p.delta = batch_rows<IO>(delta, "delta", {batch, dim, L}, io);
  check_tensor(A, "A", {dim, N}, cdt);
  p.B = batch_rows<IO>(B, "B", {batch, groups, N, L}, io);
  p.C = batch_rows<IO>(C, "C", {batch, groups, N, L}, io);
  check_tensor(D, "D", {dim}, cdt);
  check_tensor(delta_bias, "delta_bias", {dim}, cdt);
  if (z) p.z = batch_rows<IO>(*z, "z", {batch, dim, L}, io);
  p.A = A.data_ptr<T>();
  p.D = D.data_ptr<T>();
  p.delta_bias = delta_bias.data_ptr<T>();
  p.batch = batch;
  p.dim = dim;
  p.L = L;
  p.N = N;
  p.groups = groups;
  p.softplus = delta_softplus;
  p.order = order_of(L, reverse, slices);
  return p;
}

// The states the forward saves for the backward: (batch, chunks, N, dim) in the compute dtype.
inline std::vector<int64_t> chunk_states_shape(const Tensor& u, const Tensor& A) {
  return {u.size(0), (u.size(2) + scan::kChunk - 1) / scan::kChunk, A.size(1), u.size(1)};
}

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A,
                                                      const Tensor& B, const Tensor& C, const Tensor& D,
                                                      const std::optional<Tensor>& z, const Tensor& delta_bias,
                                                      bool delta_softplus, bool save_chunk_states, bool reverse,
                                                      int64_t slices) {
  Tensor out = contiguous_like(u);
  Tensor last_state = at::empty({u.size(0), u.size(1), A.size(1)}, A.options());
  Tensor chunk_states =
      at::empty(save_chunk_states ? chunk_states_shape(u, A) : std::vector<int64_t>{0}, A.options());
  dispatch_io(u.scalar_type(), "u", [&](auto io, auto ct) {
    using IO = decltype(io);
    using T = decltype(ct);
    const auto p = scan_problem<T, IO>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, slices);
    scan::forward(p, out.data_ptr<IO>(), last_state.data_ptr<T>(),
                  save_chunk_states ? chunk_states.data_ptr<T>() : nullptr, at::get_num_threads());
  });
  return {out, last_state, chunk_states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd(
    const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C, const Tensor& D,
    const std::optional<Tensor>& z, const Tensor& delta_bias, bool delta_softplus, const Tensor& dout,
    const Tensor& chunk_states, bool reverse, int64_t slices, bool deterministic) {
  check_tensor(chunk_states, "chunk_states", chunk_states_shape(u, A), A.scalar_type());
  Tensor du = contiguous_like(u), ddelta = contiguous_like(u), dB = contiguous_like(B), dC = contiguous_like(C);
  Tensor dz = z ? contiguous_like(*z) : at::empty({0}, u.options());
  Tensor dA = at::empty_like(A), dD = at::empty_like(D), ddelta_bias = at::empty_like(delta_bias);
  dispatch_io(u.scalar_type(), "u", [&](auto io, auto ct) {
    using IO = decltype(io);
    using T = decltype(ct);
    const auto p = scan_problem<T, IO>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, slices);
    const BatchRows<IO> g_out = batch_rows<IO>(dout, "dout", u.sizes(), u.scalar_type());
    scan::Grads<T, IO> g{du.data_ptr<IO>(), ddelta.data_ptr<IO>(), z ? dz.data_ptr<IO>() : nullptr,
                         dB.data_ptr<IO>(), dC.data_ptr<IO>(), dA.data_ptr<T>(), dD.data_ptr<T>(),
                         ddelta_bias.data_ptr<T>()};
    scan::backward(p, g_out, chunk_states.data_ptr<T>(), g, at::get_num_threads());
  });
  return {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias};
}

template <class T, class IO>
conv::Problem<T, IO> conv_problem(const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu, bool reverse,
                                  int64_t slices) {
  TORCH_CHECK(x.dim() == 3, "x: expected (batch, dim, L), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) >= 2 && weight.size(1) <= 4,
              "weight: expected (dim, width) with width in 2..4, got shape ", weight.sizes());
  const auto cdt = compute_dtype(x.scalar_type());
  const BatchRows<IO> rows = batch_rows<IO>(x, "x", x.sizes(), x.scalar_type());
  check_tensor(weight, "weight", {x.size(1), weight.size(1)}, cdt);
  check_tensor(bias, "bias", {x.size(1)}, cdt);
  return conv::Problem<T, IO>{rows, weight.data_ptr<T>(), bias.data_ptr<T>(),
                              x.size(0), x.size(1), x.size(2), silu, order_of(x.size(2), reverse, slices)};
}

Tensor causal_conv1d_fwd(const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu, bool reverse,
                         int64_t slices) {
  Tensor out = contiguous_like(x);
  dispatch_io(x.scalar_type(), "x", [&](auto io, auto ct) {
    using IO = decltype(io);
    using T = decltype(ct);
    conv::forward(conv_problem<T, IO>(x, weight, bias, silu, reverse, slices), weight.size(1), out.data_ptr<IO>(),
                  at::get_num_threads());
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> causal_conv1d_bwd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                     bool silu, const Tensor& dout, bool reverse, int64_t slices,
                                                     bool deterministic) {
  Tensor dx = contiguous_like(x), dweight = at::empty_like(weight), dbias = at::empty_like(bias);
  dispatch_io(x.scalar_type(), "x", [&](auto io, auto ct) {
    using IO = decltype(io);
    using T = decltype(ct);
    conv::Grads<T, IO> g{dx.data_ptr<IO>(), dweight.data_ptr<T>(), dbias.data_ptr<T>()};
    conv::backward(conv_problem<T, IO>(x, weight, bias, silu, reverse, slices), weight.size(1),
                   batch_rows<IO>(dout, "dout", x.sizes(), x.scalar_type()), g,
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
        py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("save_chunk_states"), py::kw_only(),
        py::arg("reverse"), py::arg("slices"));
  m.def("selective_scan_bwd", &segmamba::selective_scan_bwd, "selective scan backward", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("dout"), py::arg("chunk_states"), py::kw_only(),
        py::arg("reverse"), py::arg("slices"), py::arg("deterministic"));
  // Tells segmamba_kernels.ops that this backend's forward saves states for its backward, and their shape.
  m.attr("SCAN_CHUNK_STATES_STRIDE") = segmamba::scan::kChunk;
  // Every gradient is formed in one order whatever the threads (docs/design.md §3).
  m.attr("DETERMINISTIC_ALWAYS") = true;
  // The (batch, ..., L) inputs may have any batch stride, as long as each batch element is contiguous.
  m.attr("BATCH_STRIDED_INPUTS") = true;
  m.def("causal_conv1d_fwd", &segmamba::causal_conv1d_fwd, "causal depthwise conv1d forward", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("silu"), py::kw_only(), py::arg("reverse"), py::arg("slices"));
  m.def("causal_conv1d_bwd", &segmamba::causal_conv1d_bwd, "causal depthwise conv1d backward", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("silu"), py::arg("dout"), py::kw_only(), py::arg("reverse"),
        py::arg("slices"), py::arg("deterministic"));
  m.def("info", &segmamba::info, "ISA level and kernel parameters of this build");
}
