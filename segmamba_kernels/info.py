"""`python -m segmamba_kernels.info`: what is built and what runs on this machine."""

from __future__ import annotations

import importlib.util
import platform

import torch

from . import __version__
from .dispatch import backend_status, cpu_isa_level, cpu_isa_supported, deterministic_mode, get_backend


EXTENSION_MODULES = ("_cpu_baseline", "_cpu_avx2", "_cpu_avx512", "_cuda")

# Said every time because no GPU has run this code in the project's CI: what stands in for one.
GPU_VERIFICATION = """\
how the GPU code is verified without a GPU (every CI run):
  csrc/cuda  compiled by nvcc for sm_80/sm_90, and run on the CPU by an emulator (csrc/emu:
             permuted thread and block orders, counted barriers, NaN shared memory, a race
             detector; pytest -m emulated) against the float64 reference; a mutation script
             shows every removed __syncthreads and every atomicAdd made a plain += caught
  triton     run by TRITON_INTERPRET=1 against the reference, and compiled for sm_80/sm_90 with
             registers, spills and shared memory checked (tests/test_triton_compile.py)
  not seen   true concurrency inside a warp and between blocks, the GPU memory model, GPU
             arithmetic (__expf, FMA contraction: agreement to rounding only), timing and
             occupancy; benchmarks/gpu_check.sh checks these on a GPU"""


def build_info() -> dict:
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return {}
    return BUILD_INFO


def report() -> str:
    info = build_info()
    lines = [
        f"segmamba_kernels {__version__}",
        f"python {platform.python_version()} on {platform.machine()}, torch {torch.__version__}"
        f" (CUDA {torch.version.cuda}), built against torch {info.get('torch_version', '?')}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    lines.append(f"CPU SIMD: this CPU supports {cpu_isa_supported()}; CPU kernels run at {cpu_isa_level() or 'none built'}")
    # Looked up on disk rather than taken from _build_info: partial rebuilds rewrite that file.
    present = [name for name in EXTENSION_MODULES if importlib.util.find_spec(f"segmamba_kernels.{name}")]
    lines.append(f"extensions present: {', '.join(present) or 'none'}")
    if info:
        lines.append(f"C++ flags: {' '.join(info['cxx_flags'])}")
        lines.append(f"CUDA toolkit: {info['cuda_home'] or 'not used'}; arch list: {info['cuda_arch_list'] or '-'}")
    if torch.cuda.is_available():
        lines.append(f"CUDA device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("CUDA device: none")
    cpu_always = cpu_isa_level() is not None and getattr(get_backend("cpu"), "DETERMINISTIC_ALWAYS", False)
    lines.append(f"deterministic backward: {'on' if deterministic_mode() else 'off'} (SEGMAMBA_DETERMINISTIC, "
                 f"torch.use_deterministic_algorithms){'; the cpu backend is deterministic always' if cpu_always else ''}")
    lines.append("backends:")
    for name, (usable, why) in backend_status().items():
        lines.append(f"  {name:<10} {'usable' if usable else 'unavailable':<12} {why}")
    lines.append(GPU_VERIFICATION)
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
