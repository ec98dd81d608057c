// The host half of the CUDA backend's four ops (contract: segmamba_kernels/dispatch.py):
// checks what the kernels rely on, allocates outputs and scratch, plans the segments and
// picks the dtype instantiation. Shared by the CUDA extension (bindings.cpp) and the CPU
// emulator's test extension (csrc/emu/bindings.cpp), which differ only in the
// DeviceContext they pass.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
// ATen + torch's pybind casters instead of torch/extension.h: a third less compile time.
#include <torch/csrc/utils/pybind.h>

#include "launch.h"

namespace segmamba_cuda {

struct DeviceContext {
    c10::DeviceType device_type;  // where the tensors must be: CUDA, or the CPU for the emulator
    const char* device_name;      // as error messages name it: "a CUDA tensor"
    int64_t target_blocks;        // the segment planning aims the grid at this many blocks
    cudaStream_t stream;
    // Fill fresh outputs and scratch with NaN (the emulator does, so that an element no
    // kernel writes shows in the results) instead of leaving them uninitialised.
    bool poison_outputs;
};

namespace host {

using at::Tensor;

inline at::ScalarType acc_dtype(at::ScalarType io) { return io == at::kDouble ? at::kDouble : at::kFloat; }

inline Tensor device_empty(const DeviceContext& ctx, at::IntArrayRef shape, const at::TensorOptions& options) {
    Tensor t = at::empty(shape, options);
    if (ctx.poison_outputs && at::isFloatingType(t.scalar_type())) t.fill_(std::nan(""));
    return t;
}

inline Tensor device_empty_like(const DeviceContext& ctx, const Tensor& like) {
    return device_empty(ctx, like.sizes(), like.options());
}

// The first check of every op: a clear message before anything touches the device.
inline void check_device(const DeviceContext& ctx, const char* op, const char* name, const Tensor& t) {
    TORCH_CHECK(t.defined(), op, " (cuda backend): ", name, " is undefined");
    TORCH_CHECK(t.device().type() == ctx.device_type, op, " (cuda backend): ", name, " must be ", ctx.device_name,
                ", got one on ", t.device());
}

// An op's first input, a (batch, dim, L) sequence: checked before anything else, and the
// reference for the device, dtype and sizes of the others.
struct SequenceInput {
    at::ScalarType io, acc;
    int64_t batch, dim, L;
};

inline SequenceInput check_sequence_input(const DeviceContext& ctx, const char* op, const char* name, const Tensor& t) {
    check_device(ctx, op, name, t);
    TORCH_CHECK(t.dim() == 3, op, " (cuda backend): ", name, " must be (batch, dim, L), got ", t.sizes());
    const auto st = t.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
                " (cuda backend): expected dtype float32, float16, bfloat16 or float64, got ", st);
    return {st, acc_dtype(st), t.size(0), t.size(1), t.size(2)};
}

inline void check_tensor(const DeviceContext& ctx, const char* op, const char* name, const Tensor& t, const Tensor& ref,
                         at::ScalarType dtype, at::IntArrayRef shape) {
    check_device(ctx, op, name, t);
    TORCH_CHECK(t.device() == ref.device(), op, " (cuda backend): ", name, " is on ", t.device(),
                " but the first input is on ", ref.device());
    TORCH_CHECK(t.scalar_type() == dtype, op, " (cuda backend): ", name, " must have dtype ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.sizes() == shape, op, " (cuda backend): ", name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, " (cuda backend): ", name, " must be contiguous");
}

inline void check_slices(const char* op, int64_t slices, int64_t L) {
    TORCH_CHECK(slices >= 1 && L % slices == 0, op,
                " (cuda backend): slices must be a positive divisor of the sequence length L = ", L, ", got ", slices);
}

// Splits the chunks into segments until the grid (`rows` blocks per segment) has about
// ctx.target_blocks blocks, then allocates the scratch the segment pass needs.
inline void plan_segments(const DeviceContext& ctx, ScanParams& p, int64_t rows, const Tensor& like,
                          std::vector<Tensor>& scratch) {
    const int64_t wanted = (ctx.target_blocks + rows - 1) / rows;
    const int64_t nseg = std::max<int64_t>(1, std::min<int64_t>({wanted, p.nchunks, 65535}));
    p.chunks_per_seg = static_cast<int>((p.nchunks + nseg - 1) / nseg);
    p.nseg = (p.nchunks + p.chunks_per_seg - 1) / p.chunks_per_seg;
    if (p.nseg > 1) {
        scratch.push_back(device_empty(ctx, {p.batch, p.dim, p.nseg, p.dstate, 2}, like.options()));
        scratch.push_back(device_empty(ctx, {p.batch, p.dim, p.nseg, p.dstate}, like.options()));
        p.seg_maps = scratch[0].data_ptr();
        p.seg_states = scratch[1].data_ptr();
    }
}

inline bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

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

inline int vec_items_of(at::ScalarType st) { return 16 / static_cast<int>(c10::elementSize(st)); }

// Checks the scan arguments and fills everything of ScanParams but the outputs.
inline ScanParams scan_params(const DeviceContext& ctx, const char* op, const Tensor& u, const Tensor& delta,
                              const Tensor& A, const Tensor& B, const Tensor& C, const Tensor& D,
                              const c10::optional<Tensor>& z, const Tensor& delta_bias, bool delta_softplus,
                              const Tensor* dout, bool reverse, int64_t slices) {
    const auto [io, acc, batch, dim, L] = check_sequence_input(ctx, op, "u", u);
    TORCH_CHECK(A.defined() && A.dim() == 2, op, " (cuda backend): A must be (dim, N)");
    TORCH_CHECK(B.defined() && B.dim() == 4, op, " (cuda backend): B must be (batch, groups, N, L), got ",
                B.defined() ? B.sizes() : at::IntArrayRef{});
    const int64_t N = A.size(1), groups = B.size(1);
    check_tensor(ctx, op, "u", u, u, io, {batch, dim, L});
    check_tensor(ctx, op, "delta", delta, u, io, {batch, dim, L});
    check_tensor(ctx, op, "A", A, u, acc, {dim, N});
    check_tensor(ctx, op, "B", B, u, io, {batch, groups, N, L});
    check_tensor(ctx, op, "C", C, u, io, {batch, groups, N, L});
    check_tensor(ctx, op, "D", D, u, acc, {dim});
    check_tensor(ctx, op, "delta_bias", delta_bias, u, acc, {dim});
    if (z.has_value()) check_tensor(ctx, op, "z", *z, u, io, {batch, dim, L});
    if (dout != nullptr) check_tensor(ctx, op, "dout", *dout, u, io, {batch, dim, L});
    TORCH_CHECK(N >= 1 && N <= kMaxState, op, " (cuda backend): the state size N (A.shape[1]) must be in [1, ",
                kMaxState, "], got ", N);
    TORCH_CHECK(groups >= 1 && dim % groups == 0, op, " (cuda backend): groups (B.shape[1]) must divide dim = ", dim,
                ", got ", groups);
    // Step indices are int32 and may run one chunk past L.
    TORCH_CHECK(L <= INT_MAX - 4096, op, " (cuda backend): sequence length L = ", L, " exceeds the limit ",
                INT_MAX - 4096);
    TORCH_CHECK(batch * dim <= INT_MAX, op, " (cuda backend): batch * dim = ", batch * dim,
                " exceeds the grid limit ", INT_MAX);
    check_slices(op, slices, L);

    const int chunk = kScanThreads * vec_items_of(io);
    ScanParams p{};
    p.batch = static_cast<int>(batch);
    p.dim = static_cast<int>(dim);
    p.groups = static_cast<int>(groups);
    p.dstate = static_cast<int>(N);
    p.seqlen = static_cast<int>(L);
    p.nchunks = static_cast<int>((L + chunk - 1) / chunk);
    p.softplus = delta_softplus;
    p.reverse = reverse;
    p.slices = static_cast<int>(slices);
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

inline std::tuple<Tensor, Tensor> selective_scan_fwd(const DeviceContext& ctx, const Tensor& u, const Tensor& delta,
                                                     const Tensor& A, const Tensor& B, const Tensor& C,
                                                     const Tensor& D, const c10::optional<Tensor>& z,
                                                     const Tensor& delta_bias, bool delta_softplus, bool reverse,
                                                     int64_t slices) {
    ScanParams p = scan_params(ctx, "selective_scan_fwd", u, delta, A, B, C, D, z, delta_bias, delta_softplus, nullptr,
                               reverse, slices);
    Tensor out = device_empty_like(ctx, u);
    Tensor last_state = at::zeros({u.size(0), u.size(1), A.size(1)}, u.options().dtype(A.scalar_type()));
    if (u.numel() == 0) return {out, last_state};
    p.out = out.data_ptr();
    p.last_state = last_state.data_ptr();
    std::vector<Tensor> scratch;
    plan_segments(ctx, p, int64_t(p.batch) * p.dim, last_state, scratch);
    p.vec_ok = p.vec_ok && aligned16(out);
    dispatch_io(u.scalar_type(), [&](auto tag) { scan_fwd_launch<decltype(tag)>(p, ctx.stream); });
    return {out, last_state};
}

inline std::vector<Tensor> selective_scan_bwd(const DeviceContext& ctx, const Tensor& u, const Tensor& delta,
                                              const Tensor& A, const Tensor& B, const Tensor& C, const Tensor& D,
                                              const c10::optional<Tensor>& z, const Tensor& delta_bias,
                                              bool delta_softplus, const Tensor& dout, bool reverse, int64_t slices,
                                              bool deterministic) {
    ScanParams p = scan_params(ctx, "selective_scan_bwd", u, delta, A, B, C, D, z, delta_bias, delta_softplus, &dout,
                               reverse, slices);
    const auto io = u.scalar_type(), acc = acc_dtype(io);
    Tensor du = device_empty_like(ctx, u), ddelta = device_empty_like(ctx, delta);
    Tensor dz = z.has_value() ? device_empty_like(ctx, *z) : at::empty({0}, u.options());
    // Summed over blocks with atomics (zeroed), or (deterministic) written once by a final pass.
    auto grad_buffer = [&](at::IntArrayRef shape, at::ScalarType dtype) {
        return deterministic ? device_empty(ctx, shape, u.options().dtype(dtype)) : at::zeros(shape, u.options().dtype(dtype));
    };
    Tensor dA = grad_buffer(A.sizes(), acc), dD = grad_buffer(D.sizes(), acc), ddelta_bias = grad_buffer(D.sizes(), acc);
    // dB/dC collect every channel of a group: with atomics into buffers in the accumulation
    // type, cast at the end; deterministic: written in the I/O type from their fixed-point sums.
    Tensor dB = grad_buffer(B.sizes(), deterministic ? io : acc), dC = grad_buffer(C.sizes(), deterministic ? io : acc);
    if (u.numel() == 0) {
        for (Tensor* t : {&dA, &dD, &ddelta_bias, &dB, &dC}) t->zero_();
    } else {
        std::vector<Tensor> scratch;
        p.states_per_chunk = deterministic ? kDetChannels : 1;
        const int64_t cpg = p.dim / p.groups;
        p.channel_blocks = static_cast<int>((cpg + kDetChannels - 1) / kDetChannels);
        plan_segments(ctx, p, deterministic ? int64_t(p.batch) * p.groups * p.channel_blocks : int64_t(p.batch) * p.dim,
                      A, scratch);
        Tensor chunk_states =
            device_empty(ctx, {u.size(0), u.size(1), int64_t(p.nchunks) * p.states_per_chunk, A.size(1)}, A.options());
        if (deterministic) {
            scratch.push_back(device_empty(ctx, {int64_t(p.batch) * p.nseg, p.dim, p.dstate + 2}, A.options()));
            p.partials = scratch.back().data_ptr();
            scratch.push_back(at::zeros({2, B.numel()}, u.options().dtype(at::kLong)));  // dB, dC high parts
            p.fixed_hi = scratch.back().data_ptr();
            scratch.push_back(at::zeros({2, B.numel()}, u.options().dtype(at::kInt)));  // low parts (as u32)
            p.fixed_lo = scratch.back().data_ptr();
            scratch.push_back(at::zeros({2}, u.options().dtype(at::kInt)));
            p.fixed_flags = scratch.back().data_ptr<int>();
            // The low sums take channel_blocks terms below 2^lo_bits each without overflow (31 at
            // most, so that carrying them is a plain shift).
            int log2_terms = 0;
            while ((int64_t(1) << log2_terms) < p.channel_blocks) ++log2_terms;
            p.fixed_lo_bits = std::min(31, 32 - log2_terms);
            p.fixed_lo_scale = std::ldexp(1.0, p.fixed_lo_bits);
            p.fixed_hi_scale = std::ldexp(1.0, kFixedFracBits - p.fixed_lo_bits);
            // |sum| < 2^62 / hi_scale keeps the high sums inside int64, with a factor 2 to spare.
            p.fixed_limit = std::ldexp(1.0, 62 - kFixedFracBits + p.fixed_lo_bits) / p.channel_blocks;
        }
        p.du = du.data_ptr();
        p.ddelta = ddelta.data_ptr();
        p.dz = z.has_value() ? dz.data_ptr() : nullptr;
        p.dA = dA.data_ptr();
        p.dB = dB.data_ptr();
        p.dC = dC.data_ptr();
        p.dD = dD.data_ptr();
        p.ddelta_bias = ddelta_bias.data_ptr();
        p.chunk_states = chunk_states.data_ptr();
        for (const Tensor* t : {&du, &ddelta, &dB, &dC}) p.vec_ok = p.vec_ok && aligned16(*t);
        if (z.has_value()) p.vec_ok = p.vec_ok && aligned16(dz);
        dispatch_io(io, [&](auto tag) { scan_bwd_launch<decltype(tag)>(p, ctx.stream); });
    }
    return {du, ddelta, dA, dB.to(io), dC.to(io), dD, dz, ddelta_bias};  // no copy when already in io
}

inline ConvParams conv_params(const DeviceContext& ctx, const char* op, const Tensor& x, const Tensor& weight,
                              const Tensor& bias, bool silu, const Tensor* dout, bool reverse, int64_t slices) {
    const auto [io, acc, batch, dim, L] = check_sequence_input(ctx, op, "x", x);
    TORCH_CHECK(weight.defined() && weight.dim() == 2, op, " (cuda backend): weight must be (dim, width)");
    const int64_t width = weight.size(1);
    check_tensor(ctx, op, "weight", weight, x, acc, {dim, width});
    check_tensor(ctx, op, "bias", bias, x, acc, {dim});
    check_tensor(ctx, op, "x", x, x, io, {batch, dim, L});
    if (dout != nullptr) check_tensor(ctx, op, "dout", *dout, x, io, {batch, dim, L});
    TORCH_CHECK(width >= 2 && width <= kMaxWidth, op, " (cuda backend): width (weight.shape[1]) must be in [2, ",
                kMaxWidth, "], got ", width);
    const int tile = kConvThreads * vec_items_of(io);
    const int64_t ntiles = (L + tile - 1) / tile;
    TORCH_CHECK(L <= INT_MAX - 2 * tile, op, " (cuda backend): sequence length L = ", L, " exceeds the limit ",
                INT_MAX - 2 * tile);
    TORCH_CHECK(batch * dim * ntiles <= INT_MAX, op, " (cuda backend): batch * dim * ceil(L / ", tile, ") = ",
                batch * dim * ntiles, " exceeds the grid limit ", INT_MAX);
    check_slices(op, slices, L);
    ConvParams p{};
    p.reverse = reverse;
    p.slices = static_cast<int>(slices);
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

inline Tensor causal_conv1d_fwd(const DeviceContext& ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                                bool silu, bool reverse, int64_t slices) {
    ConvParams p = conv_params(ctx, "causal_conv1d_fwd", x, weight, bias, silu, nullptr, reverse, slices);
    Tensor out = device_empty_like(ctx, x);
    if (x.numel() == 0) return out;
    p.out = out.data_ptr();
    p.vec_ok = p.vec_ok && aligned16(out);
    dispatch_io(x.scalar_type(), [&](auto tag) { conv_fwd_launch<decltype(tag)>(p, ctx.stream); });
    return out;
}

inline std::tuple<Tensor, Tensor, Tensor> causal_conv1d_bwd(const DeviceContext& ctx, const Tensor& x,
                                                            const Tensor& weight, const Tensor& bias, bool silu,
                                                            const Tensor& dout, bool reverse, int64_t slices,
                                                            bool deterministic) {
    ConvParams p = conv_params(ctx, "causal_conv1d_bwd", x, weight, bias, silu, &dout, reverse, slices);
    Tensor dx = device_empty_like(ctx, x);
    // Summed over blocks with atomics (zeroed), or (deterministic) written once from the partials.
    Tensor dweight = deterministic && x.numel() > 0 ? device_empty_like(ctx, weight) : at::zeros_like(weight);
    Tensor dbias = deterministic && x.numel() > 0 ? device_empty_like(ctx, bias) : at::zeros_like(bias);
    if (x.numel() == 0) return {dx, dweight, dbias};
    Tensor partials;
    if (deterministic) {
        partials = device_empty(ctx, {int64_t(p.batch) * p.ntiles, p.dim, p.width + 1}, weight.options());
        p.partials = partials.data_ptr();
    }
    p.dx = dx.data_ptr();
    p.dweight = dweight.data_ptr();
    p.dbias = dbias.data_ptr();
    p.vec_ok = p.vec_ok && aligned16(dx);
    dispatch_io(x.scalar_type(), [&](auto tag) { conv_bwd_launch<decltype(tag)>(p, ctx.stream); });
    return {dx, dweight, dbias};
}

}  // namespace host

// Registers the four ops on m, with the keyword-only arguments of the backend contract
// (docs/design.md §3): reverse, slices and, for the backward ops, deterministic.
// Scope(first_tensor) makes the DeviceContext (.ctx) of a call, after check_device accepted
// that tensor, and holds whatever must stay set during the call (the CUDA device guard).
template <typename Scope>
void define_ops(pybind11::module_& m, const DeviceContext& check) {
    using at::Tensor;
    namespace py = pybind11;
    using OptTensor = c10::optional<Tensor>;
    m.def(
        "selective_scan_fwd",
        [check](const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                const Tensor& D, const OptTensor& z, const Tensor& delta_bias, bool delta_softplus, bool reverse,
                int64_t slices) {
            host::check_device(check, "selective_scan_fwd", "u", u);
            const Scope s(u);
            return host::selective_scan_fwd(s.ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                                            slices);
        },
        "Selective scan forward -> (out, last_state)", py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"),
        py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("delta_softplus"), py::kw_only(),
        py::arg("reverse") = false, py::arg("slices") = 1);
    m.def(
        "selective_scan_bwd",
        [check](const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                const Tensor& D, const OptTensor& z, const Tensor& delta_bias, bool delta_softplus,
                const Tensor& dout, bool reverse, int64_t slices, bool deterministic) {
            host::check_device(check, "selective_scan_bwd", "u", u);
            const Scope s(u);
            return host::selective_scan_bwd(s.ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout, reverse,
                                            slices, deterministic);
        },
        "Selective scan backward -> [du, ddelta, dA, dB, dC, dD, dz (empty without z), ddelta_bias]", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("dout"), py::kw_only(), py::arg("reverse") = false,
        py::arg("slices") = 1, py::arg("deterministic") = false);
    m.def(
        "causal_conv1d_fwd",
        [check](const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu, bool reverse, int64_t slices) {
            host::check_device(check, "causal_conv1d_fwd", "x", x);
            const Scope s(x);
            return host::causal_conv1d_fwd(s.ctx, x, weight, bias, silu, reverse, slices);
        },
        "Causal depthwise conv1d forward", py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("silu"),
        py::kw_only(), py::arg("reverse") = false, py::arg("slices") = 1);
    m.def(
        "causal_conv1d_bwd",
        [check](const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu, const Tensor& dout, bool reverse,
                int64_t slices, bool deterministic) {
            host::check_device(check, "causal_conv1d_bwd", "x", x);
            const Scope s(x);
            return host::causal_conv1d_bwd(s.ctx, x, weight, bias, silu, dout, reverse, slices, deterministic);
        },
        "Causal depthwise conv1d backward -> (dx, dweight, dbias)", py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("silu"), py::arg("dout"), py::kw_only(), py::arg("reverse") = false, py::arg("slices") = 1,
        py::arg("deterministic") = false);
}

}  // namespace segmamba_cuda
