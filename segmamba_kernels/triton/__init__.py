"""Triton backend: selective scan and causal conv1d, forward and backward.

Implements the backend contract documented at the top of
``segmamba_kernels.dispatch`` (inputs checked and contiguous, B/C as
(batch, groups, N, L), A/D/delta_bias/weight/bias in the compute dtype, which is
float32, or float64 for float64 inputs). Runs on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (set before this package is imported).
Design notes: ``scan`` and ``conv`` module docstrings.
"""

from .conv import causal_conv1d_bwd, causal_conv1d_fwd
from .scan import selective_scan_bwd, selective_scan_fwd

__all__ = ["selective_scan_fwd", "selective_scan_bwd", "causal_conv1d_fwd", "causal_conv1d_bwd"]
