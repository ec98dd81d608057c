"""The CUDA extension is built whenever a toolkit was found at build time, exports the
backend contract of segmamba_kernels.dispatch, and refuses bad input with a clear error.
Runs without a GPU; numerical checks of the cuda backend are in test_kernels.py."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

CONTRACT = {"selective_scan_fwd", "selective_scan_bwd", "causal_conv1d_fwd", "causal_conv1d_bwd"}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _build_info() -> dict:
    try:
        from segmamba_kernels._build_info import BUILD_INFO
    except ImportError:
        pytest.skip("segmamba_kernels/_build_info.py is missing: the package was not built by setup.py")
    return BUILD_INFO


@pytest.fixture(scope="module")
def cuda_ext() -> ModuleType:
    info = _build_info()
    if "segmamba_kernels._cuda" not in info["extensions"]:
        pytest.skip("the CUDA extension was not built (no CUDA toolkit at build time, or SEGMAMBA_BUILD_CUDA=0)")
    return importlib.import_module("segmamba_kernels._cuda")


def test_built_whenever_a_toolkit_was_found() -> None:
    info = _build_info()
    if info["cuda_home"] is None:
        pytest.skip("no CUDA toolkit was found at build time")
    assert "segmamba_kernels._cuda" in info["extensions"], info
    importlib.import_module("segmamba_kernels._cuda")


def test_exports_the_backend_contract(cuda_ext: ModuleType) -> None:
    public = {name for name in dir(cuda_ext) if not name.startswith("_")}
    assert public == CONTRACT


def _scan_args(device: str = "cpu", dtype: torch.dtype = torch.float32, N: int = 3) -> dict:
    batch, dim, L = 1, 2, 5
    return dict(
        u=torch.randn(batch, dim, L, device=device, dtype=dtype),
        delta=torch.rand(batch, dim, L, device=device, dtype=dtype),
        A=-torch.rand(dim, N, device=device),
        B=torch.randn(batch, 1, N, L, device=device, dtype=dtype),
        C=torch.randn(batch, 1, N, L, device=device, dtype=dtype),
        D=torch.zeros(dim, device=device),
        z=None,
        delta_bias=torch.zeros(dim, device=device),
        delta_softplus=True,
    )


def _conv_args(device: str = "cpu", width: int = 4) -> dict:
    return dict(x=torch.randn(1, 2, 5, device=device), weight=torch.randn(2, width, device=device),
                bias=torch.zeros(2, device=device), silu=True)


def test_cpu_tensors_are_refused(cuda_ext: ModuleType) -> None:
    # Keyword calls also pin the argument names of the contract.
    scan, conv = _scan_args(), _conv_args()
    calls = {
        "selective_scan_fwd": lambda: cuda_ext.selective_scan_fwd(**scan),
        "selective_scan_bwd": lambda: cuda_ext.selective_scan_bwd(**scan, dout=torch.randn(1, 2, 5)),
        "causal_conv1d_fwd": lambda: cuda_ext.causal_conv1d_fwd(**conv),
        "causal_conv1d_bwd": lambda: cuda_ext.causal_conv1d_bwd(**conv, dout=torch.randn(1, 2, 5)),
    }
    for name, call in calls.items():
        first = "u" if name.startswith("selective") else "x"
        with pytest.raises(RuntimeError, match=rf"{name} \(cuda backend\): {first} must be a CUDA tensor, got one on cpu"):
            call()


@needs_gpu
def test_unsupported_shapes_are_refused(cuda_ext: ModuleType) -> None:
    with pytest.raises(RuntimeError, match=r"state size N .* must be in \[1, 256\], got 257"):
        cuda_ext.selective_scan_fwd(**_scan_args("cuda", N=257))
    with pytest.raises(RuntimeError, match=r"width .* must be in \[2, 4\], got 5"):
        cuda_ext.causal_conv1d_fwd(**_conv_args("cuda", width=5))
    bad = _scan_args("cuda")
    bad["D"] = bad["D"].double()
    with pytest.raises(RuntimeError, match=r"D must have dtype Float, got Double"):
        cuda_ext.selective_scan_fwd(**bad)


# --------------------------------------------------------------------------- on a GPU: the carry paths

def _scan64(u, delta, A, B, C, D, z, delta_bias):
    """Float64 selective scan (softplus on) in plain torch ops: segmamba_kernels.reference
    indexes one step at a time, whose backward costs a full-size buffer per step (quadratic
    in L); this one steps over unbound views, so autograd stays linear at these sizes."""
    dt = torch.nn.functional.softplus(delta + delta_bias[:, None])
    rep = u.shape[1] // B.shape[1]
    Bx, Cx = B.repeat_interleave(rep, 1), C.repeat_interleave(rep, 1)  # (batch, dim, N, L)
    decay = torch.exp(dt[:, :, None] * A[None, :, :, None])
    inputs = dt[:, :, None] * Bx * u[:, :, None]
    h, states = torch.zeros_like(decay[..., 0]), []
    for a_t, x_t in zip(decay.unbind(-1), inputs.unbind(-1)):
        h = a_t * h + x_t
        states.append(h)
    y = (torch.stack(states, -1) * Cx).sum(2) + D[:, None] * u
    return y * torch.nn.functional.silu(z), h


def check_carries_and_orders(ext: ModuleType, dev: torch.device, order: str, sms: int) -> None:
    """Several segments of several chunks each (the grid sized from the SM count as the
    planner sizes it), in the given scan order, against a float64 computation; the
    deterministic backward repeatable bit for bit. `ext` is the CUDA extension (or, to check
    this test itself, the CPU emulator's, tests/test_cuda_emulated.py)."""
    from segmamba_kernels import from_order, to_order
    from segmamba_kernels.reference import causal_conv1d_ref

    dtype, N, groups, S, chunk = torch.float32, 16, 2, 16, 128 * 4
    batch, dim = 2, 2 * max(1, (sms * 16 // 3) // 4)  # about 3 segments
    L = 6 * chunk
    wanted = (sms * 16 + batch * dim - 1) // (batch * dim)
    per_seg = -(-6 // min(wanted, 6))
    assert per_seg >= 2 and -(-6 // per_seg) >= 2, "several segments of several chunks"
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, generator=g, dtype=torch.float64)  # noqa: E731
    x = dict(u=r(batch, dim, L), delta=0.5 * r(batch, dim, L) - 1,
             A=-0.1 - 2 * torch.rand(dim, N, device=dev, generator=g, dtype=torch.float64),
             B=r(batch, groups, N, L), C=r(batch, groups, N, L), D=r(dim), z=r(batch, dim, L), delta_bias=0.3 * r(dim))
    dout = r(batch, dim, L).to(dtype)
    reverse, slices = {"forward": (False, 1), "reverse": (True, 1), "inter_slice": (False, S)}[order]
    io = {k: (v.float() if k in ("A", "D", "delta_bias") else v.to(dtype)) for k, v in x.items()}
    args = [io[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    kw = dict(reverse=reverse, slices=slices)
    out, last = ext.selective_scan_fwd(*args, True, **kw)
    grads = ext.selective_scan_bwd(*args, True, dout, **kw)
    det = [ext.selective_scan_bwd(*args, True, dout, **kw, deterministic=True) for _ in range(2)]

    leaves = {k: v.double().detach().requires_grad_() for k, v in io.items()}
    y, ref_last = _scan64(**{k: (to_order(v, order, slices) if v.dim() >= 3 else v) for k, v in leaves.items()})
    ref = from_order(y, order, slices)
    ref.backward(dout.double())

    def close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 2e-4) -> None:
        err = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-3)
        assert err <= tol, f"{order} {what}: relative error {err:.2e}"

    close(out, ref.detach(), "out")
    close(last, ref_last.detach(), "last_state")
    for k, gd, g1, g2 in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), grads, det[0], det[1]):
        close(gd, leaves[k].grad, f"d{k}")
        close(g1, leaves[k].grad, f"d{k} (deterministic)")
        assert torch.equal(g1, g2), f"{order} d{k}: the deterministic backward differs between two runs"

    xc, w, b = r(batch, dim, L).to(dtype), r(dim, 4).float(), r(dim).float()
    yc = ext.causal_conv1d_fwd(xc, w, b, True, **kw)
    dc = [ext.causal_conv1d_bwd(xc, w, b, True, dout, **kw, deterministic=d_) for d_ in (False, True, True)]
    cl = [t.double().detach().requires_grad_() for t in (xc, w, b)]
    ref_c = from_order(causal_conv1d_ref(to_order(cl[0], order, slices), cl[1], cl[2], "silu"), order, slices)
    ref_c.backward(dout.double())
    close(yc, ref_c.detach(), "conv out", 1e-5)
    for i, what in enumerate(("dx", "dweight", "dbias")):
        close(dc[0][i], cl[i].grad, f"conv {what}", 1e-5)
        close(dc[1][i], cl[i].grad, f"conv {what} (deterministic)", 1e-5)
        assert torch.equal(dc[1][i], dc[2][i]), f"{order} conv {what}: deterministic runs differ"


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("order", ["forward", "reverse", "inter_slice"])
def test_gpu_carries_and_orders(cuda_ext: ModuleType, order: str) -> None:
    dev = torch.device("cuda")
    check_carries_and_orders(cuda_ext, dev, order, torch.cuda.get_device_properties(dev).multi_processor_count)
