"""segmamba_kernels: selective scan and causal depthwise conv1d for Mamba layers.

Backends: ``reference`` (pure PyTorch), ``cpu`` (C++/OpenMP, csrc/cpu), ``cuda``
(csrc/cuda) and ``triton``. ``backend="auto"`` picks by device; the environment
variable ``SEGMAMBA_BACKEND`` overrides ``auto``. See docs/design.md §3 for the contracts.
"""

from .dispatch import BACKENDS, BackendUnavailableError, backend_status, cpu_isa_level, warn_if_nothing_compiled
from .ops import causal_conv1d, selective_scan
from .reference import causal_conv1d_ref, selective_scan_ref

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend_status",
    "causal_conv1d",
    "causal_conv1d_ref",
    "cpu_isa_level",
    "selective_scan",
    "selective_scan_ref",
]
__version__ = "0.1.0"

warn_if_nothing_compiled()
