"""Every compiled/Triton backend against the pure-PyTorch reference: outputs and gradients.

Backends that cannot run here are skipped with the reason from `backend_status()`. The
Triton backend runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py), so its
shapes stay tiny; `cuda` needs a GPU. Where a backend computes in float64 (cpu) it is held
to ~1e-10 of a float64 reference; otherwise float32 is compared with a float64 reference.
Scan orders (docs/design.md §3) are compared with the reference walking the same order; a
backend that does not implement an order or the deterministic mode yet raises
NotImplementedError, and its test is then reported as an expected failure (xfail) saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib

import pytest
import torch

import segmamba_kernels as sk
from segmamba_kernels import dispatch
from segmamba_kernels import causal_conv1d, causal_conv1d_ref, selective_scan, selective_scan_ref

STATUS = sk.backend_status()
COMPILED = ("cpu", "triton", "cuda")
# Backends that compute in float64 when given float64 (the others are tested in float32).
FLOAT64_BACKENDS = ("cpu", "triton")


def _require(backend: str) -> torch.device:
    ok, why = STATUS[backend]
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    return torch.device("cuda" if backend == "cuda" else "cpu")


@pytest.fixture(params=COMPILED)
def backend(request) -> str:
    _require(request.param)
    return request.param


def _tiny(backend: str) -> bool:
    # The Triton interpreter runs a kernel instance in Python: keep its problems tiny.
    return backend == "triton" and not torch.cuda.is_available()


@contextlib.contextmanager
def _unless_not_implemented(backend: str):
    """Runs the body; a backend's NotImplementedError (a feature it does not have yet) becomes an xfail."""
    try:
        yield
    except NotImplementedError as e:
        pytest.xfail(f"{backend} does not implement this yet: {e}")


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_close_scaled(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """max |got - ref| <= tol * max(max |ref|, 1e-3): relative to the tensor's scale (as low precision
    needs), with a floor for tensors that are exactly zero in the reference (dA at L = 1)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(ref.abs().max().item(), 1e-3)
    err = (got - ref).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} * scale {scale:.3g}"


# --------------------------------------------------------------------------- selective scan

@dataclasses.dataclass(frozen=True)
class ScanCase:
    batch: int
    dim: int
    L: int
    N: int
    groups: int | None  # None: B/C are (batch, N, L)

    def __str__(self) -> str:
        return f"b{self.batch}-d{self.dim}-L{self.L}-N{self.N}-g{self.groups}"


# L = 1; odd L; L not a multiple of the CPU chunk (32 with AVX-512, else 64) over several chunks.
# dim 22 = 2 groups of 11 and dim 19: never a multiple of any SIMD width.
CPU_SCAN_CASES = [
    ScanCase(2, 22, 1, 4, 2),
    ScanCase(1, 19, 37, 1, None),
    ScanCase(2, 22, 77, 16, 2),
    ScanCase(1, 19, 200, 16, 1),
]
TINY_SCAN_CASES = [ScanCase(1, 4, 1, 4, None), ScanCase(2, 4, 17, 4, 2), ScanCase(1, 3, 24, 16, None)]

OPTIONS = [  # D, z, delta_bias, delta_softplus, return_last_state
    dict(D=True, z=True, delta_bias=True, delta_softplus=True, last=True),
    dict(D=False, z=False, delta_bias=False, delta_softplus=False, last=False),
    dict(D=True, z=False, delta_bias=True, delta_softplus=False, last=True),
    dict(D=False, z=True, delta_bias=False, delta_softplus=True, last=False),
]


def make_scan_inputs(case: ScanCase, opts: dict, dtype=torch.float64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bc = (case.batch, case.N, case.L) if case.groups is None else (case.batch, case.groups, case.N, case.L)
    io = lambda t: t.to(dtype)  # noqa: E731
    fp = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(
        u=io(r(case.batch, case.dim, case.L)),
        # Without softplus dt = delta + delta_bias is used as is: keep it positive so states stay bounded.
        delta=io(0.5 * r(case.batch, case.dim, case.L) - 1.0 if opts["delta_softplus"]
                 else 0.2 + 0.3 * torch.rand(case.batch, case.dim, case.L, generator=g, dtype=torch.float64)),
        A=(-0.1 - 2.0 * torch.rand(case.dim, case.N, generator=g, dtype=torch.float64)).to(fp),
        B=io(r(*bc)),
        C=io(r(*bc)),
        D=r(case.dim).to(fp) if opts["D"] else None,
        z=io(r(case.batch, case.dim, case.L)) if opts["z"] else None,
        delta_bias=((0.3 * r(case.dim)) if opts["delta_softplus"] else 0.1 * torch.rand(case.dim, generator=g,
                    dtype=torch.float64)).to(fp) if opts["delta_bias"] else None,
    )


def run_scan_with_grads(fn, inputs: dict, opts: dict, dout: torch.Tensor, device, **kw):
    leaves = {k: (v.detach().to(device).requires_grad_() if v is not None else None) for k, v in inputs.items()}
    res = fn(**leaves, delta_softplus=opts["delta_softplus"], return_last_state=opts["last"], **kw)
    out, last = res if opts["last"] else (res, None)
    out.backward(dout.to(device=device, dtype=out.dtype))
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return out, last, grads


def check_scan(backend: str, case: ScanCase, opts: dict, dtype: torch.dtype, ref_dtype: torch.dtype, tol: float,
               order: str = "forward", n_slices: int = 1):
    device = _require(backend)
    x = make_scan_inputs(case, opts, dtype)
    dout = torch.randn(case.batch, case.dim, case.L, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    walk = dict(order=order, n_slices=n_slices)
    with _unless_not_implemented(backend):
        out, last, grads = run_scan_with_grads(selective_scan, x, opts, dout.to(dtype), device, backend=backend, **walk)
    # The reference sees the same (already rounded) values, in ref_dtype, and walks the same order.
    xr = {k: (v.to(ref_dtype) if v is not None else None) for k, v in x.items()}
    ref, ref_last, ref_grads = run_scan_with_grads(selective_scan_ref, xr, opts, dout.to(dtype).to(ref_dtype), "cpu",
                                                   **walk)
    assert out.dtype == dtype and out.device.type == device.type
    assert_close_scaled(out, ref, tol, "out")
    if opts["last"]:
        assert last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close_scaled(last, ref_last, tol, "last_state")
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert g.dtype == x[name].dtype, f"d{name}: dtype {g.dtype}, expected {x[name].dtype}"
        assert_close_scaled(g, ref_grads[name], tol, f"d{name}")


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(k for k, v in o.items() if v) or "none")
@pytest.mark.parametrize("case_index", range(4))
def test_scan_matches_reference_fp64_or_fp32(backend, case_index, opts):
    cases = TINY_SCAN_CASES if _tiny(backend) else CPU_SCAN_CASES
    if case_index >= len(cases):
        pytest.skip("fewer shapes for this backend")
    if _tiny(backend) and case_index > 0 and opts in OPTIONS[2:]:
        pytest.skip("Triton interpreter: mixed option sets only on the smallest shape")
    if backend in FLOAT64_BACKENDS:
        check_scan(backend, cases[case_index], opts, torch.float64, torch.float64, 1e-10)
    else:
        check_scan(backend, cases[case_index], opts, torch.float32, torch.float64, 2e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)],
                         ids=["fp32", "bf16", "fp16"])
def test_scan_low_precision(backend, dtype, tol):
    case = ScanCase(1, 5, 33, 4, None) if _tiny(backend) else ScanCase(2, 38, 150, 16, 2)
    check_scan(backend, case, OPTIONS[0], dtype, torch.float64, tol)


def test_scan_non_contiguous_inputs(backend):
    device = _require(backend)
    case = ScanCase(2, 6, 21, 4, None) if _tiny(backend) else ScanCase(2, 19, 70, 8, None)
    x = make_scan_inputs(case, OPTIONS[0], torch.float32)
    # Transposed views with the same values: (batch, L, dim) -> (batch, dim, L), A as (N, dim).T.
    nc = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v is not None and v.dim() >= 2 else v)
          for k, v in x.items()}
    assert not nc["u"].is_contiguous() and not nc["B"].is_contiguous() and not nc["A"].is_contiguous()
    dout = torch.randn(case.batch, case.dim, case.L)
    got, got_last, got_g = run_scan_with_grads(selective_scan, nc, OPTIONS[0], dout, device, backend=backend)
    want, want_last, want_g = run_scan_with_grads(selective_scan, x, OPTIONS[0], dout, device, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_last, want_last, rtol=0, atol=0)
    # Gradients summed over channels or time (dA, dB, dC, dD, ddelta_bias) may be added in another
    # order on a second run outside the deterministic mode (GPU atomics): equal up to rounding.
    for k in want_g:
        assert_close_scaled(got_g[k], want_g[k], 1e-5, f"d{k}")


def test_batch_strided_inputs(backend, record_ops):
    """Slices along dim 1 of larger tensors (the Mamba layer's x / z halves of xz, B / C of the
    x_proj output): the same results as contiguous copies; a backend with BATCH_STRIDED_INPUTS
    (cpu) reads them in place, without a copy."""
    device = _require(backend)
    batch, dim, L, N = 2, (4 if _tiny(backend) else 19), (17 if _tiny(backend) else 150), 4
    g = torch.Generator().manual_seed(0)
    xz = torch.randn(batch, 2 * dim, L, generator=g).to(device)
    proj = torch.randn(batch, 3 + 2 * N, L, generator=g).to(device)
    u, z, B, C = xz[:, :dim], xz[:, dim:], proj[:, 3:3 + N], proj[:, 3 + N:]
    delta = (0.3 * torch.randn(batch, dim, L, generator=g)).to(device)
    A = -torch.rand(dim, N, generator=g).to(device)
    w = torch.randn(dim, 4, generator=g).to(device)
    assert not (u.is_contiguous() or z.is_contiguous() or B.is_contiguous())

    def run(u, z, B, C, x):
        with record_ops() as ops:
            out = selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, backend=backend, order="inter_slice",
                                 n_slices=L if _tiny(backend) else 10)
            y = causal_conv1d(x, w, activation="silu", backend=backend, order="reverse")
        return out, y, ops.seen

    with _unless_not_implemented(backend):
        out, y, seen = run(u, z, B, C, u)
        want_out, want_y, _ = run(u.contiguous(), z.contiguous(), B.contiguous(), C.contiguous(), u.contiguous())
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(y, want_y, rtol=0, atol=0)
    if getattr(dispatch.get_backend(backend), "BATCH_STRIDED_INPUTS", False):
        copies = [op for op in seen if "clone" in op or "copy" in op or "contiguous" in op]
        assert not copies, copies


@contextlib.contextmanager
def _deterministic(switch: str, monkeypatch):
    """The deterministic mode (docs/design.md §3), switched on one of its two ways."""
    if switch == "SEGMAMBA_DETERMINISTIC":
        monkeypatch.setenv("SEGMAMBA_DETERMINISTIC", "1")
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("switch", ["torch.use_deterministic_algorithms", "SEGMAMBA_DETERMINISTIC"])
def test_deterministic_mode_gradients_are_bitwise_reproducible(backend, switch, monkeypatch):
    """Issue 17: with the deterministic mode on, every gradient is the same bit for bit over runs
    (on a GPU, sums over many blocks would otherwise depend on their schedule)."""
    device = _require(backend)
    assert not sk.deterministic_mode()
    case = ScanCase(1, 4, 24, 4, None) if _tiny(backend) else ScanCase(2, 100, 300, 16, None)
    x = make_scan_inputs(case, OPTIONS[0], torch.float32)
    dout = torch.randn(case.batch, case.dim, case.L)
    conv_args = make_conv_inputs(case.batch, case.dim, case.L, 4, True, torch.float32)

    def run() -> dict:
        _, _, grads = run_scan_with_grads(selective_scan, x, OPTIONS[0], dout, device, backend=backend)
        leaves = [t.to(device).requires_grad_() for t in conv_args]
        causal_conv1d(*leaves, "silu", backend=backend).backward(dout.to(device))
        return {**grads, **{f"conv d{k}": t.grad for k, t in zip(("x", "weight", "bias"), leaves)}}

    with _deterministic(switch, monkeypatch):
        assert sk.deterministic_mode()
        with _unless_not_implemented(backend):
            first, second = run(), run()
    for k in first:
        assert torch.equal(first[k], second[k]), f"{k}: differs between two runs in the deterministic mode"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_scan_extreme_decay_and_large_delta(backend, dtype):
    """A*dt down to -1e5 (exp underflows to 0) and delta above softplus's threshold: finite, right."""
    device = _require(backend)
    if dtype == torch.float64 and backend not in FLOAT64_BACKENDS:
        pytest.skip(f"{backend} computes in float32")
    case = ScanCase(1, 5, 30, 4, None) if _tiny(backend) else ScanCase(1, 19, 90, 16, None)
    opts = OPTIONS[0]
    x = make_scan_inputs(case, opts, dtype)
    g = torch.Generator().manual_seed(3)
    x["A"] = -(10.0 ** (4 * torch.rand(case.dim, case.N, generator=g, dtype=torch.float64))).to(x["A"].dtype)
    x["delta"] = (torch.randn(case.batch, case.dim, case.L, generator=g, dtype=torch.float64) * 15 + 10).to(dtype)
    dout = torch.randn(case.batch, case.dim, case.L, generator=g, dtype=torch.float64).to(dtype)
    out, last, grads = run_scan_with_grads(selective_scan, x, opts, dout, device, backend=backend)
    as64 = {k: (v.double() if v is not None else None) for k, v in x.items()}
    ref, ref_last, ref_grads = run_scan_with_grads(selective_scan_ref, as64, opts, dout.double(), "cpu")
    if dtype == torch.float64:
        tols = dict.fromkeys(["out", "last"] + list(grads), 1e-10)
    else:
        # With |A| up to 1e4, ddelta sums terms ~1e4 times larger than itself: float32 cannot do
        # better than the float32 reference does, so the backend must match that accuracy.
        r32, r32_last, r32_grads = run_scan_with_grads(selective_scan_ref, x, opts, dout, "cpu")

        def rel_err(a, b):
            return (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1e-3)

        tols = {"out": 4 * rel_err(r32, ref) + 1e-5, "last": 4 * rel_err(r32_last, ref_last) + 1e-5}
        tols.update({k: 4 * rel_err(r32_grads[k], ref_grads[k]) + 1e-5 for k in grads})
    assert_close_scaled(out, ref, tols["out"], "out")
    assert_close_scaled(last, ref_last, tols["last"], "last_state")
    for name in grads:
        assert_close_scaled(grads[name], ref_grads[name], tols[name], f"d{name}")


def test_scan_gradcheck_cpu():
    _require("cpu")
    case = ScanCase(1, 3, 9, 2, None)
    for opts in (OPTIONS[0], OPTIONS[1]):
        x = make_scan_inputs(case, opts, torch.float64)
        names = [k for k, v in x.items() if v is not None]

        def f(*args, opts=opts, names=names):
            kw = dict(zip(names, args))
            return selective_scan(**kw, delta_softplus=opts["delta_softplus"], backend="cpu")

        args = tuple(x[k].clone().requires_grad_() for k in names)
        assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-6)


# --------------------------------------------------------------------------- scan orders

# (L, order, n_slices): L = 1; odd L; several chunks, not a multiple of any; inter-slice with S = 1
# and S = L (both the identity order), S below every SIMD width over several staged batches (the
# CPU stages inter-slice batches of whole columns), S = 16 over two batches (in-register W x W
# block copies at every width), S = 20 (blocks plus leftover slices, a partial last batch).
CPU_ORDER_CASES = [(1, "reverse", 1), (1, "inter_slice", 1), (37, "reverse", 1), (150, "reverse", 1),
                   (150, "inter_slice", 1), (150, "inter_slice", 150), (150, "inter_slice", 3),
                   (640, "inter_slice", 16), (720, "inter_slice", 20)]
TINY_ORDER_CASES = [(1, "reverse", 1), (17, "reverse", 1), (24, "inter_slice", 4), (24, "inter_slice", 24)]


def _order_id(c: tuple) -> str:
    return f"L{c[0]}-{c[1]}" + (f"-S{c[2]}" if c[1] == "inter_slice" else "")


@pytest.mark.parametrize("case_index", range(len(CPU_ORDER_CASES)))
def test_scan_orders_match_reference(backend, case_index):
    cases = TINY_ORDER_CASES if _tiny(backend) else CPU_ORDER_CASES
    if case_index >= len(cases):
        pytest.skip("fewer shapes for this backend")
    L, order, n_slices = cases[case_index]
    shape = ScanCase(1, 5, L, 4, None) if _tiny(backend) else ScanCase(2, 22, L, 16, 2)
    dtype, tol = (torch.float64, 1e-10) if backend in FLOAT64_BACKENDS else (torch.float32, 2e-4)
    check_scan(backend, shape, OPTIONS[0], dtype, torch.float64, tol, order=order, n_slices=n_slices)
    if case_index in (3, 7):
        check_scan(backend, shape, OPTIONS[1], dtype, torch.float64, tol, order=order, n_slices=n_slices)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("order,n_slices", [("reverse", 1), ("inter_slice", 16)], ids=["reverse", "inter_slice"])
def test_scan_orders_low_precision(backend, order, n_slices, dtype, tol):
    # 320 = 16 slices x 20: W x W blocks and leftover columns at every width.
    case = ScanCase(1, 5, 32, 4, None) if _tiny(backend) else ScanCase(2, 38, 320, 16, 2)
    check_scan(backend, case, OPTIONS[0], dtype, torch.float64, tol, order=order,
               n_slices=min(n_slices, case.L // 8))


# --------------------------------------------------------------------------- causal conv1d

def make_conv_inputs(batch, dim, L, width, with_bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    fp = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(batch, dim, L, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(dim, width, generator=g, dtype=torch.float64).to(fp)
    b = torch.randn(dim, generator=g, dtype=torch.float64).to(fp) if with_bias else None
    return x, w, b


def check_conv(backend, batch, dim, L, width, with_bias, act, dtype, tol, order="forward", n_slices=1):
    device = _require(backend)
    x, w, b = make_conv_inputs(batch, dim, L, width, with_bias, dtype)
    dout = torch.randn(batch, dim, L, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    walk = dict(order=order, n_slices=n_slices)

    def run(fn, args, dev, **kw):
        leaves = [a.detach().to(dev).requires_grad_() if a is not None else None for a in args]
        out = fn(*leaves, activation=act, **kw)
        out.backward(dout.to(device=dev, dtype=out.dtype))
        return out, [a.grad if a is not None else None for a in leaves]

    with _unless_not_implemented(backend):
        out, grads = run(causal_conv1d, (x, w, b), device, backend=backend, **walk)
    ref, ref_grads = run(causal_conv1d_ref, tuple(a.double() if a is not None else None for a in (x, w, b)), "cpu",
                         **walk)
    assert out.dtype == dtype
    assert_close_scaled(out, ref, tol, "out")
    for name, g_, r_ in zip(("x", "weight", "bias"), grads, ref_grads):
        if r_ is not None:
            assert_close_scaled(g_, r_, tol, f"d{name}")


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("width", [2, 3, 4])
def test_conv_matches_reference(backend, width, with_bias, act):
    shapes = [(1, 3, 1), (2, 5, 37)] if _tiny(backend) else [(1, 3, 1), (2, 5, 37), (2, 7, 4096 + 61)]
    dtype, tol = (torch.float64, 1e-12) if backend in FLOAT64_BACKENDS else (torch.float32, 1e-5)
    for batch, dim, L in shapes:
        check_conv(backend, batch, dim, L, width, with_bias, act, dtype, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)],
                         ids=["fp32", "bf16", "fp16"])
def test_conv_low_precision(backend, dtype, tol):
    L = 29 if _tiny(backend) else 300
    check_conv(backend, 2, 6, L, 4, True, "silu", dtype, tol)


# The CPU conv walks a row's (S, L / S) grid in chunks of whole columns, at least 1024 (4096 / S):
# S = 3 and S = 2 over two chunks (the taps reach 1 and 2 columns back, wrapping to the last
# slice), a forward-order row over two 4096-step chunks backwards, S = L, S = 1.
CPU_CONV_ORDER_CASES = [(1, "reverse", 1), (37, "reverse", 1), (4096 + 61, "reverse", 1), (150, "inter_slice", 1),
                        (150, "inter_slice", 150), (150, "inter_slice", 5), (4500, "inter_slice", 3),
                        (4500, "inter_slice", 2), (64 * 40, "inter_slice", 64)]
TINY_CONV_ORDER_CASES = [(1, "reverse", 1), (37, "reverse", 1), (36, "inter_slice", 4), (36, "inter_slice", 2)]


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("case_index", range(len(CPU_CONV_ORDER_CASES)))
def test_conv_orders_match_reference(backend, case_index, width):
    cases = TINY_CONV_ORDER_CASES if _tiny(backend) else CPU_CONV_ORDER_CASES
    if case_index >= len(cases):
        pytest.skip("fewer shapes for this backend")
    L, order, n_slices = cases[case_index]
    dtype, tol = (torch.float64, 1e-12) if backend in FLOAT64_BACKENDS else (torch.float32, 1e-5)
    check_conv(backend, 2, 3, L, width, True, "silu", dtype, tol, order=order, n_slices=n_slices)
    if case_index == 6:
        check_conv(backend, 2, 3, L, 3, False, None, dtype, tol, order=order, n_slices=n_slices)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("order,n_slices", [("reverse", 1), ("inter_slice", 6)], ids=["reverse", "inter_slice"])
def test_conv_orders_low_precision(backend, order, n_slices, dtype, tol):
    check_conv(backend, 2, 6, 30 if _tiny(backend) else 300, 4, True, "silu", dtype, tol, order=order,
               n_slices=n_slices)


def test_conv_non_contiguous_input(backend):
    device = _require(backend)
    x, w, b = make_conv_inputs(2, 6, 33, 3, True, torch.float32)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xt.is_contiguous()
    got = causal_conv1d(xt.to(device), w.to(device), b.to(device), "silu", backend=backend)
    want = causal_conv1d(x.to(device), w.to(device), b.to(device), "silu", backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_conv_gradcheck_cpu():
    _require("cpu")
    for act in (None, "silu"):
        x, w, b = make_conv_inputs(2, 3, 11, 4, True, torch.float64)
        args = tuple(t.clone().requires_grad_() for t in (x, w, b))
        assert torch.autograd.gradcheck(lambda *a, act=act: causal_conv1d(*a, activation=act, backend="cpu"), args)


# --------------------------------------------------------------------------- every CPU ISA level

@pytest.fixture(params=dispatch.CPU_ISA_LEVELS)
def cpu_level(request, monkeypatch):
    """Makes the CPU backend run the kernels of one ISA level. Dispatch runs only the best level
    this CPU has; the lower ones (what older CPUs get) run here too. Returns the module."""
    _require("cpu")
    level, best = request.param, dispatch.cpu_isa_supported()
    if dispatch.CPU_ISA_LEVELS.index(level) < dispatch.CPU_ISA_LEVELS.index(best):
        pytest.skip(f"this CPU runs up to {best}, not {level}")
    try:
        mod = importlib.import_module(f"segmamba_kernels._cpu_{level}")
    except ImportError as e:
        pytest.skip(f"{level} kernels not built: {e}")
    monkeypatch.setattr(dispatch, "_cpu_module", lambda: (mod, level, ""))
    return mod


def test_cpu_isa_level_matches_reference(cpu_level):
    # dim 19: whole SIMD tiles (moved by in-register transposes) and a partial one at every
    # width; L = 150: two whole chunks and a partial one.
    case = ScanCase(2, 19, 150, 16, None)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4), (torch.bfloat16, 3e-2)):
        check_scan("cpu", case, OPTIONS[0], dtype, torch.float64, tol)
    check_scan("cpu", case, OPTIONS[1], torch.float64, torch.float64, 1e-10)
    check_conv("cpu", 2, 19, 150, 4, True, "silu", torch.float64, 1e-12)


@pytest.mark.parametrize("order,n_slices", [("reverse", 1), ("inter_slice", 16)], ids=["reverse", "inter_slice"])
def test_cpu_isa_level_orders_match_reference(cpu_level, order, n_slices):
    # 320 = 16 slices x 20 columns: W x W block copies and leftover columns at every width.
    case = ScanCase(2, 19, 320, 16, None)
    walk = dict(order=order, n_slices=n_slices)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        check_scan("cpu", case, OPTIONS[0], dtype, torch.float64, tol, **walk)
    check_conv("cpu", 2, 19, 320, 4, True, "silu", torch.float64, 1e-12, **walk)


ORDER_WALKS = [("forward", 1), ("reverse", 1), ("inter_slice", 20)]


@pytest.mark.parametrize("order,n_slices", ORDER_WALKS, ids=[o for o, _ in ORDER_WALKS])
@pytest.mark.parametrize("threads,L", [(1, 320), (2, 320), (3, 320), (3, 300)])
def test_cpu_orders_over_threads(threads, L, order, n_slices):
    """dim 100: the CPU backward splits each (batch, group)'s channels into two parts and adds
    their dB / dC sums; batch 2 gives four parts for 1, 2 or 3 threads (with 3, one thread takes
    two parts, of different pairs). L = 320 keeps every dB / dC row aligned to a line (the parts'
    own rows start on one too), so the parts' sums take the non-temporal store path, and other
    threads read them back; L = 300 takes the ordinary stores."""
    _require("cpu")
    case = ScanCase(2, 100, L, 16, None)
    with _threads(threads):
        check_scan("cpu", case, OPTIONS[0], torch.float64, torch.float64, 1e-10, order=order, n_slices=n_slices)
        check_scan("cpu", case, OPTIONS[0], torch.bfloat16, torch.float64, 3e-2, order=order, n_slices=n_slices)
        check_conv("cpu", 2, 7, L, 4, True, "silu", torch.float64, 1e-12, order=order, n_slices=n_slices)


@pytest.mark.parametrize("order,n_slices", ORDER_WALKS, ids=[o for o, _ in ORDER_WALKS])
@pytest.mark.parametrize("batch", [1, 2])
def test_cpu_backward_bitwise_identical_over_threads(batch, order, n_slices):
    """The CPU backend is deterministic always (docs/design.md §3): the same gradients, bit for
    bit, over repeated runs and 1, 2 or 3 threads. dim 100 splits the channels of each
    (batch, group) into two parts whose dB / dC sums are added; with one pair (batch 1) and two
    threads the parts run on different threads."""
    _require("cpu")
    case = ScanCase(batch, 100, 320, 16, None)
    x = make_scan_inputs(case, OPTIONS[0], torch.float32)
    dout = torch.randn(case.batch, case.dim, case.L)
    conv_args = make_conv_inputs(batch, 24, case.L, 4, True, torch.float32)
    walk = dict(order=order, n_slices=n_slices)

    def run() -> dict:
        _, _, grads = run_scan_with_grads(selective_scan, x, OPTIONS[0], dout, "cpu", backend="cpu", **walk)
        leaves = [t.clone().requires_grad_() for t in conv_args]
        causal_conv1d(*leaves, "silu", backend="cpu", **walk).backward(dout[:, :24])
        return {**grads, **{f"conv d{k}": t.grad for k, t in zip(("x", "weight", "bias"), leaves)}}

    runs = {}
    for threads in (1, 1, 2, 3):
        with _threads(threads):
            runs.setdefault(threads, []).append(run())
    first = runs[1][0]
    for threads, results in runs.items():
        for result in results:
            for k in first:
                assert torch.equal(result[k], first[k]), f"d{k} with {threads} thread(s) differs from 1 thread"


@pytest.mark.parametrize("case,dtype,opts,tol", [
    (ScanCase(2, 22, 4096, 4, 2), torch.float64, OPTIONS[0], 1e-10),
    (ScanCase(1, 19, 8192, 2, None), torch.float32, OPTIONS[1], 2e-4),
], ids=lambda x: str(x) if isinstance(x, (ScanCase, torch.dtype)) else "")
def test_cpu_scan_staged_rows(cpu_level, case, dtype, opts, tol):
    """Rows a multiple of `scan_staged_row_bytes` long (32^3 fp32 in the model) make the CPU
    backward read its inputs through per-thread row copies, a batch of steps at a time, walked
    backwards: batch boundaries (2 or 4 chunks per batch, by level), a partial SIMD tile,
    groups, with and without the gate."""
    row_bytes = cpu_level.info()["scan_staged_row_bytes"]
    assert case.L * dtype.itemsize % row_bytes == 0, "the case no longer takes the staged path"
    check_scan("cpu", case, opts, dtype, torch.float64, tol)


def test_cpu_scan_staged_rows_reverse():
    """The same staged copies for the reverse order: batches walked forwards in memory, each copied
    in scan order (reversed)."""
    _require("cpu")
    case = ScanCase(1, 19, 4096, 2, None)
    assert case.L * 8 % dispatch.get_backend("cpu").info()["scan_staged_row_bytes"] == 0
    check_scan("cpu", case, OPTIONS[0], torch.float64, torch.float64, 1e-10, order="reverse")
