"""Every compiled/Triton backend against the pure-PyTorch reference: outputs and gradients.

Backends that cannot run here are skipped with the reason from `backend_status()`. The
Triton backend runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py), so its
shapes stay tiny; `cuda` needs a GPU. Where a backend computes in float64 (cpu) it is held
to ~1e-10 of a float64 reference; otherwise float32 is compared with a float64 reference.
"""

from __future__ import annotations

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


def check_scan(backend: str, case: ScanCase, opts: dict, dtype: torch.dtype, ref_dtype: torch.dtype, tol: float):
    device = _require(backend)
    x = make_scan_inputs(case, opts, dtype)
    dout = torch.randn(case.batch, case.dim, case.L, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, last, grads = run_scan_with_grads(selective_scan, x, opts, dout.to(dtype), device, backend=backend)
    # The reference sees the same (already rounded) values, in ref_dtype.
    xr = {k: (v.to(ref_dtype) if v is not None else None) for k, v in x.items()}
    ref, ref_last, ref_grads = run_scan_with_grads(selective_scan_ref, xr, opts, dout.to(dtype).to(ref_dtype), "cpu")
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
    for k in want_g:
        torch.testing.assert_close(got_g[k], want_g[k], rtol=0, atol=0)


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


# --------------------------------------------------------------------------- causal conv1d

def make_conv_inputs(batch, dim, L, width, with_bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    fp = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(batch, dim, L, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(dim, width, generator=g, dtype=torch.float64).to(fp)
    b = torch.randn(dim, generator=g, dtype=torch.float64).to(fp) if with_bias else None
    return x, w, b


def check_conv(backend, batch, dim, L, width, with_bias, act, dtype, tol):
    device = _require(backend)
    x, w, b = make_conv_inputs(batch, dim, L, width, with_bias, dtype)
    dout = torch.randn(batch, dim, L, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)

    def run(fn, args, dev, **kw):
        leaves = [a.detach().to(dev).requires_grad_() if a is not None else None for a in args]
        out = fn(*leaves, activation=act, **kw)
        out.backward(dout.to(device=dev, dtype=out.dtype))
        return out, [a.grad if a is not None else None for a in leaves]

    out, grads = run(causal_conv1d, (x, w, b), device, backend=backend)
    ref, ref_grads = run(causal_conv1d_ref, tuple(a.double() if a is not None else None for a in (x, w, b)), "cpu")
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


@pytest.mark.parametrize("case", [ScanCase(1, 40, 300, 16, None), ScanCase(2, 40, 300, 16, None),
                                  ScanCase(1, 40, 320, 16, None)], ids=str)
def test_cpu_scan_split_over_threads(case):
    """Fewer (batch, group) pairs than threads: the CPU backward splits a group's channels over
    threads and adds their dB / dC sums; with 3 threads the ranges are uneven and one crosses
    from one batch element to the next. L = 320 keeps every dB / dC row aligned to a line (the
    parts' own rows start on one too), so every part's sums take the non-temporal store path, and
    other threads read them back; L = 300 takes the ordinary stores."""
    _require("cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        check_scan("cpu", case, OPTIONS[0], torch.float64, torch.float64, 1e-10)
        check_scan("cpu", case, OPTIONS[1], torch.float64, torch.float64, 1e-10)
        check_scan("cpu", case, OPTIONS[0], torch.bfloat16, torch.float64, 3e-2)
    finally:
        torch.set_num_threads(before)


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
