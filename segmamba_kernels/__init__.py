"""segmamba_kernels: selective scan and causal depthwise conv1d for Mamba layers.

Backends: ``reference`` (pure PyTorch), ``cpu`` (C++/OpenMP, csrc/cpu), ``cuda``
(csrc/cuda) and ``triton``. ``backend="auto"`` picks by device; the environment
variable ``SEGMAMBA_BACKEND`` overrides ``auto``. Both ops walk the tokens in a scan
order (``ORDERS``) without permuting them. See docs/design.md §3 for the contracts.
"""

from .dispatch import (BACKENDS, BackendUnavailableError, backend_status, cpu_isa_level, deterministic_mode,
                       warn_if_nothing_compiled)
from .ops import causal_conv1d, selective_scan
from .orders import ORDERS, from_order, to_order
from .reference import causal_conv1d_ref, selective_scan_ref

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ORDERS",
    "backend_status",
    "causal_conv1d",
    "causal_conv1d_ref",
    "cpu_isa_level",
    "deterministic_mode",
    "from_order",
    "selective_scan",
    "selective_scan_ref",
    "to_order",
]
__version__ = "0.1.0"

warn_if_nothing_compiled()
