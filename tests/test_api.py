"""Public API of segmamba_kernels: the reference math, scan orders, backend choice, the
deterministic mode, argument errors, torch.compile."""

import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import segmamba_kernels as sk
from segmamba_kernels import BackendUnavailableError, causal_conv1d, selective_scan
from segmamba_kernels import dispatch
from segmamba_kernels.dispatch import resolve_backend

CPU_BUILT = sk.backend_status()["cpu"][0]


def scan_inputs(batch=2, dim=4, L=7, N=3, groups=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bc = (batch, N, L) if groups is None else (batch, groups, N, L)
    return dict(u=r(batch, dim, L), delta=r(batch, dim, L), A=-torch.rand(dim, N, generator=g, dtype=dtype),
                B=r(*bc), C=r(*bc), D=r(dim), z=r(batch, dim, L), delta_bias=r(dim))


# --------------------------------------------------------------------------- reference math

def test_scan_reference_single_step_closed_form():
    # With L = 1 the state is dt * B * u, so out = (sum_n C B) dt u + D u, gated by silu(z).
    x = scan_inputs(L=1)
    dt = F.softplus(x["delta"] + x["delta_bias"][None, :, None])
    y = (x["C"] * x["B"]).sum(1, keepdim=True) * dt * x["u"] + x["D"][None, :, None] * x["u"]
    expected = y * F.silu(x["z"])
    got = sk.selective_scan_ref(**x, delta_softplus=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_scan_reference_matches_explicit_recurrence_with_groups():
    x = scan_inputs(dim=4, L=5, N=2, groups=2)
    out, last = sk.selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], return_last_state=True)
    for b in range(2):
        for d in range(4):
            g = d // 2
            h = torch.zeros(2, dtype=torch.float64)
            for t in range(5):
                dt = x["delta"][b, d, t]
                h = torch.exp(dt * x["A"][d]) * h + dt * x["B"][b, g, :, t] * x["u"][b, d, t]
                assert torch.allclose(out[b, d, t], (h * x["C"][b, g, :, t]).sum(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(last[b, d], h)


def test_conv_reference_matches_explicit_sum():
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    out = sk.causal_conv1d_ref(x, w, bias, activation="silu")
    expected = torch.zeros_like(x)
    for t in range(6):
        acc = bias.expand(2, 3).clone()
        for k in range(4):
            src = t - 3 + k
            if src >= 0:
                acc = acc + w[:, k] * x[:, :, src]
        expected[:, :, t] = F.silu(acc)
    torch.testing.assert_close(out, expected)


def scan_position(t: int, L: int, order: str, n_slices: int) -> int:
    """docs/design.md §3: scan step t touches memory position T(R(t))."""
    s = L - 1 - t if order == "reverse" else t
    S = n_slices if order == "inter_slice" else 1
    return (s % S) * (L // S) + s // S


@pytest.mark.parametrize("order,n_slices", [("forward", 3), ("reverse", 1), ("inter_slice", 3), ("inter_slice", 12)])
def test_reference_orders_follow_the_design_formula(order, n_slices):
    """The reference walks the recurrence (and the conv's window) through m(t) = T(R(t)), with
    inputs and outputs in memory order, and returns the state after the last scan step."""
    L = 12
    x = scan_inputs(dim=2, L=L, N=2)
    out, last = sk.selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                      True, True, order=order, n_slices=n_slices)
    w, bias = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    conv = sk.causal_conv1d_ref(x["u"], w, bias, order=order, n_slices=n_slices)
    dt = F.softplus(x["delta"] + x["delta_bias"][None, :, None])
    h = torch.zeros(2, 2, 2, dtype=torch.float64)
    for t in range(L):
        m = scan_position(t, L, order, n_slices)
        h = torch.exp(dt[:, :, m, None] * x["A"]) * h + (dt[:, :, m] * x["u"][:, :, m])[..., None] * x["B"][:, None, :, m]
        y = (h * x["C"][:, None, :, m]).sum(-1) + x["D"] * x["u"][:, :, m]
        torch.testing.assert_close(out[:, :, m], y * F.silu(x["z"][:, :, m]))
        taps = [scan_position(t - s, L, order, n_slices) if t - s >= 0 else None for s in range(3)]
        expected = bias + sum(w[:, 2 - s] * x["u"][:, :, m_s] for s, m_s in enumerate(taps) if m_s is not None)
        torch.testing.assert_close(conv[:, :, m], expected)
    torch.testing.assert_close(last, h)


def test_orders_permute_and_invert():
    t = torch.arange(12.0).view(1, 1, 12)
    for order, n_slices in (("forward", 1), ("reverse", 1), ("inter_slice", 3)):
        walked = sk.to_order(t, order, n_slices)
        assert walked.flatten().tolist() == [float(scan_position(i, 12, order, n_slices)) for i in range(12)]
        assert torch.equal(sk.from_order(walked, order, n_slices), t)
    assert sk.ORDERS == ("forward", "reverse", "inter_slice")


def test_reference_keeps_io_dtype_and_fp32_state():
    x = scan_inputs(dtype=torch.bfloat16)
    x["A"] = x["A"].float()
    out, last = sk.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32


# --------------------------------------------------------------------------- backend choice

def test_auto_picks_cpu_when_built_else_reference():
    assert resolve_backend("auto", torch.device("cpu")) == ("cpu" if CPU_BUILT else "reference")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("SEGMAMBA_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("SEGMAMBA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SEGMAMBA_BACKEND.*'fastest'"):
        resolve_backend("auto", torch.device("cpu"))


def test_unknown_backend_is_an_error():
    x = scan_inputs()
    with pytest.raises(ValueError, match="backend: expected one of .* got 'cudnn'"):
        selective_scan(**x, backend="cudnn")


def test_missing_backend_is_an_error_not_a_fallback(monkeypatch):
    x = torch.randn(1, 2, 3)
    w = torch.randn(2, 3)
    # The cuda backend cannot serve CPU tensors, built or not; the message says why.
    with pytest.raises(BackendUnavailableError, match="cuda"):
        causal_conv1d(x, w, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        causal_conv1d(x, w, backend="triton")


def test_deterministic_mode_switches(monkeypatch):
    monkeypatch.delenv("SEGMAMBA_DETERMINISTIC", raising=False)
    assert not sk.deterministic_mode()
    monkeypatch.setenv("SEGMAMBA_DETERMINISTIC", "1")
    assert sk.deterministic_mode()
    monkeypatch.setenv("SEGMAMBA_DETERMINISTIC", "0")
    assert not sk.deterministic_mode()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert sk.deterministic_mode()
    finally:
        torch.use_deterministic_algorithms(before)
    monkeypatch.setenv("SEGMAMBA_DETERMINISTIC", "yes")
    with pytest.raises(ValueError, match="SEGMAMBA_DETERMINISTIC: expected 0 or 1, got 'yes'"):
        sk.deterministic_mode()


@pytest.mark.skipif(not CPU_BUILT, reason="needs a compiled backend to wrap")
@pytest.mark.parametrize("order,n_slices,reverse,slices", [("forward", 2, False, 1), ("reverse", 1, True, 1),
                                                           ("inter_slice", 2, False, 2)])
def test_backends_get_the_order_and_the_forwards_deterministic_mode(monkeypatch, order, n_slices, reverse, slices):
    """ops.py hands every backend function `reverse` and `slices`, and both backward functions the
    `deterministic` flag decided when the forward ran (switching the mode between forward and
    backward changes nothing), all by keyword."""
    real = dispatch.get_backend("cpu")
    calls = []

    def spy(name):
        def call(*args, **kwargs):
            calls.append((name, kwargs))
            return getattr(real, name)(*args, **kwargs)
        return call

    fake = types.SimpleNamespace(SCAN_CHUNK_STATES_STRIDE=real.SCAN_CHUNK_STATES_STRIDE,
                                 **{n: spy(n) for n in ("selective_scan_fwd", "selective_scan_bwd",
                                                        "causal_conv1d_fwd", "causal_conv1d_bwd")})
    monkeypatch.setattr(dispatch, "_cpu_module", lambda: (fake, "spy", ""))
    x = {k: v.requires_grad_() for k, v in scan_inputs(L=8).items()}
    monkeypatch.setenv("SEGMAMBA_DETERMINISTIC", "1")
    out = selective_scan(**x, delta_softplus=True, order=order, n_slices=n_slices, backend="cpu")
    conv = causal_conv1d(x["u"], torch.randn(4, 3, dtype=torch.float64), order=order, n_slices=n_slices,
                         backend="cpu")
    monkeypatch.setenv("SEGMAMBA_DETERMINISTIC", "0")
    (out.sum() + conv.sum()).backward()
    by_name = {name: kwargs for name, kwargs in calls}
    assert set(by_name) == {"selective_scan_fwd", "selective_scan_bwd", "causal_conv1d_fwd", "causal_conv1d_bwd"}
    for name, kwargs in by_name.items():
        expected = dict(reverse=reverse, slices=slices, **({"deterministic": True} if name.endswith("bwd") else {}))
        assert kwargs == expected, name


@pytest.mark.skipif(CPU_BUILT, reason="the cpu backend is built here")
def test_unbuilt_cpu_backend_says_how_to_build():
    with pytest.raises(BackendUnavailableError, match="pip install"):
        causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 3), backend="cpu")


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "segmamba_kernels.info"], capture_output=True, text=True, check=True)
    assert "backends:" in out.stdout and "reference" in out.stdout and "CPU SIMD" in out.stdout
    assert "verified without a GPU" in out.stdout and "not seen" in out.stdout


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("change, match", [
    (lambda x: x.update(u=x["u"][0]), r"u: expected a \(batch, dim, L\) tensor \(3-D\), got 2-D"),
    (lambda x: x.update(delta=x["delta"][:, :, :-1]), r"delta: expected shape .* = \(2, 4, 7\), got \(2, 4, 6\)"),
    (lambda x: x.update(A=x["A"][:3]), r"A: expected shape \(dim, N\) with dim = 4"),
    (lambda x: x.update(B=x["B"][:, :2]), r"B: expected shape \(batch, N, L\) = \(2, 3, 7\), got \(2, 2, 7\)"),
    (lambda x: x.update(C=x["C"][..., :5]), r"C: expected shape"),
    (lambda x: x.update(B=torch.randn(2, 3, 3, 7), C=torch.randn(2, 3, 3, 7)), r"B: groups must divide dim = 4, got groups = 3"),
    (lambda x: x.update(D=x["D"][:2]), r"D: expected shape \(dim,\) = \(4,\), got \(2,\)"),
    (lambda x: x.update(z=x["z"][:1]), r"z: expected shape"),
    (lambda x: x.update(delta_bias=x["delta_bias"][None]), r"delta_bias: expected shape"),
    (lambda x: x.update(u=x["u"].to(torch.int32)), r"u: expected dtype in .* got torch.int32"),
    (lambda x: x.update(u=x["u"][:, :, :0], delta=x["delta"][:, :, :0], z=None,
                        B=x["B"][..., :0], C=x["C"][..., :0]), r"u: expected sequence length L >= 1"),
    (lambda x: x.update(A=x["A"].to("meta")), r"one device, got .*A on meta"),
    (lambda x: x.update(u=[1.0]), r"u: expected a torch.Tensor, got list"),
])
def test_scan_argument_errors(change, match):
    x = scan_inputs()
    change(x)
    with pytest.raises((ValueError, TypeError), match=match):
        selective_scan(**x)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 3), torch.randn(3, 4)), r"x: expected a \(batch, dim, L\) tensor"),
    ((torch.randn(1, 3, 5), torch.randn(3, 5)), r"weight: expected width in 2..4, got width = 5"),
    ((torch.randn(1, 3, 5), torch.randn(3, 1)), r"weight: expected width in 2..4, got width = 1"),
    ((torch.randn(1, 3, 5), torch.randn(2, 4)), r"weight: expected shape \(dim, width\) with dim = 3"),
    ((torch.randn(1, 3, 5), torch.randn(3, 4), torch.randn(4)), r"bias: expected shape \(dim,\) = \(3,\), got \(4,\)"),
    ((torch.randn(1, 3, 5), torch.randn(3, 4), None, "relu"), r"activation: expected None, 'silu' or 'swish', got 'relu'"),
    ((torch.randn(1, 3, 5).half().to(torch.int8), torch.randn(3, 4)), r"x: expected dtype"),
])
def test_conv_argument_errors(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        causal_conv1d(*args)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(order="sideways"), ValueError, r"order: expected one of \('forward', 'reverse', 'inter_slice'\), got 'sideways'"),
    (dict(order="inter_slice", n_slices=5), ValueError, r"n_slices: expected a positive divisor of the sequence length "
                                                       r"L = 12, got 5"),
    (dict(order="forward", n_slices=0), ValueError, r"n_slices: expected a positive divisor .* got 0"),
    (dict(order="reverse", n_slices=-3), ValueError, r"n_slices: expected a positive divisor .* got -3"),
    (dict(order="inter_slice", n_slices=2.0), TypeError, r"n_slices: expected an int, got float"),
    (dict(order="inter_slice", n_slices=True), TypeError, r"n_slices: expected an int, got bool"),
])
@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if CPU_BUILT else []))
def test_order_argument_errors(backend, kwargs, error, match):
    x = scan_inputs(L=12)
    with pytest.raises(error, match=match):
        selective_scan(**x, backend=backend, **kwargs)
    with pytest.raises(error, match=match):
        causal_conv1d(x["u"], torch.randn(4, 3, dtype=torch.float64), backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if CPU_BUILT else []))
def test_non_contiguous_inputs_are_handled(backend):
    x = scan_inputs(L=9)
    strided = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() >= 2 else v) for k, v in x.items()}
    assert not strided["u"].is_contiguous()
    got = selective_scan(**strided, delta_softplus=True, backend=backend)
    torch.testing.assert_close(got, sk.selective_scan_ref(**x, delta_softplus=True))
    xc = torch.randn(2, 6, 3, dtype=torch.float64).transpose(1, 2)
    w = torch.randn(4, 3, dtype=torch.float64).t()
    torch.testing.assert_close(causal_conv1d(xc, w, backend=backend), sk.causal_conv1d_ref(xc.contiguous(), w.contiguous()))


# --------------------------------------------------------------------------- torch.compile

def _block(x, w, cb, dt, A, B, C, D, order="forward", n_slices=1):
    u = causal_conv1d(x, w, cb, activation="silu", order=order, n_slices=n_slices)
    return selective_scan(u, dt, A, B, C, D, z=x, delta_softplus=True, order=order, n_slices=n_slices)


@pytest.mark.parametrize("order", ["forward", "inter_slice"])
@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if CPU_BUILT else []))
def test_torch_compile_fullgraph_forward_and_backward(backend, order, monkeypatch):
    monkeypatch.setenv("SEGMAMBA_BACKEND", backend)
    torch._dynamo.reset()
    batch, dim, L, N = 1, 4, 6, 2
    args = [torch.randn(batch, dim, L), torch.randn(dim, 4), torch.randn(dim), torch.randn(batch, dim, L),
            -torch.rand(dim, N), torch.randn(batch, N, L), torch.randn(batch, N, L), torch.randn(dim)]
    args = [a.requires_grad_() for a in args]
    block = lambda *a: _block(*a, order=order, n_slices=3)  # noqa: E731
    eager = block(*args)
    eager_grads = torch.autograd.grad(eager.square().sum(), args)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*args)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), args)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
