"""Public API of segmamba_kernels: the reference math, backend choice, argument errors, torch.compile."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import segmamba_kernels as sk
from segmamba_kernels import BackendUnavailableError, causal_conv1d, selective_scan
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


@pytest.mark.skipif(CPU_BUILT, reason="the cpu backend is built here")
def test_unbuilt_cpu_backend_says_how_to_build():
    with pytest.raises(BackendUnavailableError, match="pip install"):
        causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 3), backend="cpu")


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "segmamba_kernels.info"], capture_output=True, text=True, check=True)
    assert "backends:" in out.stdout and "reference" in out.stdout and "CPU SIMD" in out.stdout


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

def _block(x, w, cb, dt, A, B, C, D):
    u = causal_conv1d(x, w, cb, activation="silu")
    return selective_scan(u, dt, A, B, C, D, z=x, delta_softplus=True)


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if CPU_BUILT else []))
def test_torch_compile_fullgraph_forward_and_backward(backend, monkeypatch):
    monkeypatch.setenv("SEGMAMBA_BACKEND", backend)
    torch._dynamo.reset()
    batch, dim, L, N = 1, 4, 6, 2
    args = [torch.randn(batch, dim, L), torch.randn(dim, 4), torch.randn(dim), torch.randn(batch, dim, L),
            -torch.rand(dim, N), torch.randn(batch, N, L), torch.randn(batch, N, L), torch.randn(dim)]
    args = [a.requires_grad_() for a in args]
    eager = _block(*args)
    eager_grads = torch.autograd.grad(eager.square().sum(), args)
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")(*args)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), args)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
