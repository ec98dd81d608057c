"""Which backend runs an op, and how: the one place where that is decided.

Every compiled or Triton backend is a module with four functions sharing one
contract (inputs already checked, contiguous, B/C as (batch, groups, N, L),
A/D/delta_bias/weight/bias in the compute dtype, float32 or float64):

    selective_scan_fwd(u, delta, A, B, C, D, z | None, delta_bias, delta_softplus, *, reverse, slices)
        -> (out in u.dtype, last_state (batch, dim, N) in the compute dtype)
    selective_scan_bwd(u, delta, A, B, C, D, z | None, delta_bias, delta_softplus, dout, *,
                       reverse, slices, deterministic)
        -> (du, ddelta, dA, dB, dC, dD, dz (empty when z is None), ddelta_bias)
    causal_conv1d_fwd(x, weight, bias, silu, *, reverse, slices) -> out in x.dtype
    causal_conv1d_bwd(x, weight, bias, silu, dout, *, reverse, slices, deterministic) -> (dx, dweight, dbias)

The keywords are always passed. `reverse: bool` and `slices: int` give the scan order
(docs/design.md §3; segmamba_kernels.orders.backend_order): scan step t is at position
T(R(t)) of L, R(t) = L - 1 - t if reverse, T(s) = (s % slices) * (L / slices) + s // slices.
Inputs and outputs stay in memory order. `deterministic: bool` (deterministic_mode(), decided
at forward time) asks for gradients bitwise identical over repeated runs; a backend that is
deterministic always says so with DETERMINISTIC_ALWAYS = True (the CPU backend).

A backend with BATCH_STRIDED_INPUTS = True (the CPU backend) also takes the (batch, ..., L)
inputs (u, delta, B, C, z, dout; x and dout of the conv) with any batch stride, as long as each
batch element is contiguous: slices of a larger tensor along dim 1 then need no copy.

A backend may also save states in the forward for its backward (the CPU backend
does, so that its backward need not re-run the forward recurrence). It then has
an int attribute SCAN_CHUNK_STATES_STRIDE = S, and its scan functions are

    selective_scan_fwd(..., delta_softplus, save_chunk_states, *, reverse, slices)
        -> (out, last_state, chunk_states: (batch, ceil(L / S), N, dim) in the compute dtype,
            the state before every S-th scan step; empty unless save_chunk_states)
    selective_scan_bwd(..., delta_softplus, dout, chunk_states, *, reverse, slices, deterministic)
        -> as above

The `reference` backend is plain PyTorch (segmamba_kernels.reference) and is
differentiated by autograd directly.
"""

from __future__ import annotations

import functools
import importlib
import os
import platform
import warnings
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "SEGMAMBA_BACKEND"
DETERMINISTIC_ENV_VAR = "SEGMAMBA_DETERMINISTIC"
# Highest first; names follow torch.backends.cpu.get_cpu_capability().
CPU_ISA_LEVELS = ("avx512", "avx2", "baseline")
BUILD_HINT = ("build it with `pip install .` (or `pip install --no-build-isolation .` when torch is "
              "already installed) from the source tree, and import segmamba_kernels from outside that tree")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run here."""


def cpu_isa_supported() -> str:
    """The best ISA level this CPU runs, as PyTorch detects it (honours ATEN_CPU_CAPABILITY)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "baseline"
    cap = torch.backends.cpu.get_cpu_capability().lower()
    if cap.startswith("avx512"):
        return "avx512"
    if cap.startswith("avx2"):
        return "avx2"
    return "baseline"


@functools.cache
def _cpu_module() -> tuple[ModuleType | None, str | None, str]:
    """(module, ISA level, why not) for the best built CPU extension this machine can run."""
    best = cpu_isa_supported()
    errors = []
    for level in CPU_ISA_LEVELS[CPU_ISA_LEVELS.index(best):]:
        try:
            return importlib.import_module(f"segmamba_kernels._cpu_{level}"), level, ""
        except ImportError as e:
            errors.append(f"{level}: {e}")
    return None, None, "; ".join(errors)


def cpu_isa_level() -> str | None:
    """The ISA level of the CPU kernels that run here, or None when none is built."""
    return _cpu_module()[1]


@functools.cache
def _cuda_module() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("segmamba_kernels._cuda"), ""
    except ImportError as e:
        return None, str(e)


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_module() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("segmamba_kernels.triton"), ""
    except ImportError as e:
        return None, str(e)


def backend_status() -> dict[str, tuple[bool, str]]:
    """name -> (usable on some device here, explanation)."""
    cpu, level, why_cpu = _cpu_module()
    cuda, why_cuda = _cuda_module()
    tri, why_tri = _triton_module()
    gpu = torch.cuda.is_available()
    return {
        "reference": (True, "pure PyTorch, any device and dtype"),
        "cpu": (cpu is not None, f"ISA level {level}" if cpu else f"not built ({why_cpu})"),
        "cuda": (cuda is not None and gpu,
                 ("built" if cuda else f"not built ({why_cuda})") + ("" if gpu else ", no CUDA device")),
        "triton": (tri is not None and (gpu or _triton_interpret()),
                   (f"import failed ({why_tri})" if tri is None else "importable")
                   + ("" if gpu else (", TRITON_INTERPRET=1: runs on CPU tensors" if _triton_interpret()
                                      else ", no CUDA device (TRITON_INTERPRET=1 runs it on CPU tensors)"))),
    }


def get_backend(name: str) -> ModuleType:
    """The module implementing backend `name` (not 'reference'); raises if it is not available."""
    if name == "cpu":
        mod, _, why = _cpu_module()
        if mod is None:
            raise BackendUnavailableError(f"backend 'cpu' is not built ({why}); {BUILD_HINT}")
        return mod
    if name == "cuda":
        mod, why = _cuda_module()
        if mod is None:
            raise BackendUnavailableError(
                f"backend 'cuda' is not built ({why}); install a CUDA build of torch and a CUDA toolkit "
                f"(CUDA_HOME), then {BUILD_HINT}")
        return mod
    if name == "triton":
        mod, why = _triton_module()
        if mod is None:
            raise BackendUnavailableError(f"backend 'triton' cannot be imported ({why}); `pip install triton`")
        return mod
    raise ValueError(f"backend: expected one of {BACKENDS} or 'auto', got {name!r}")


def scan_chunk_states_stride(name: str) -> int:
    """Steps between the states backend `name` saves in its forward for its backward (0: none)."""
    return getattr(get_backend(name), "SCAN_CHUNK_STATES_STRIDE", 0)


# Constant while tracing, as resolve_backend.
@torch.compiler.assume_constant_result
def accepts_batch_strides(name: str) -> bool:
    """Whether backend `name` reads (batch, ..., L) inputs with any batch stride (BATCH_STRIDED_INPUTS)."""
    return name != "reference" and bool(getattr(get_backend(name), "BATCH_STRIDED_INPUTS", False))


# torch.compile runs this once while tracing and bakes the answer into the graph: the
# extension imports and CPU-capability probe inside cannot be traced.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn the `backend=` argument into a concrete backend name for tensors on `device`."""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"{ENV_VAR}: expected one of {BACKENDS} or 'auto', got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "cuda" if _cuda_module()[0] is not None else "triton"
        return "cpu" if _cpu_module()[0] is not None else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or 'auto', got {backend!r}")
    if backend == "reference":
        return backend
    get_backend(backend)  # raises with a how-to when missing
    if backend == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(f"backend 'cpu' runs on CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _triton_interpret()):
        raise BackendUnavailableError(
            f"backend 'triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}")
    return backend


# Like resolve_backend: decided once per forward (baked in while tracing), and handed to the
# backward as an argument, so that a backward runs in the mode its forward ran in.
@torch.compiler.assume_constant_result
def deterministic_mode() -> bool:
    """Whether backward passes must be bitwise reproducible: on under
    ``torch.use_deterministic_algorithms(True)`` or with ``SEGMAMBA_DETERMINISTIC=1``."""
    flag = os.environ.get(DETERMINISTIC_ENV_VAR, "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"{DETERMINISTIC_ENV_VAR}: expected 0 or 1, got {flag!r}")
    return flag == "1" or torch.are_deterministic_algorithms_enabled()


def warn_if_nothing_compiled() -> None:
    if _cpu_module()[0] is None and _cuda_module()[0] is None:
        warnings.warn(
            "segmamba_kernels: no compiled kernels found, CPU tensors use the slow pure-PyTorch reference "
            f"backend; {BUILD_HINT}.", RuntimeWarning, stacklevel=3)
