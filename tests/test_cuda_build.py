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
