"""Keeping freed host memory for reuse: a process-wide setting of glibc's malloc.

With its defaults, glibc returns memory freed at the top of its heap to the OS as soon as more
than a trim threshold (at most a few tens of MB) is free, and serves every block above its mmap
threshold (at most 32 MiB) from a fresh mapping that it unmaps again on free. A CPU training step
frees its activations and gradients and allocates as much again in the next step, so every step
faults those pages back in, one 4 KiB page at a time, each zeroed by the kernel. The trainer and
the benchmarks therefore ask malloc to keep freed memory and to serve every block, however
large, from its heap. Measured on 2 cores (benchmarks/RESULTS.md): the main job (no block over
32 MiB) faults 2.7x fewer pages and runs a few per cent faster; a SegMamba step on a 64^3 crop
(blocks up to ~100 MB) went from 1.3-1.6 M faults and 8.9-9.5 s to under 0.03 M and 7.0-7.5 s,
with peak memory 3.6 -> 3.9-4.0 GB. The memory a process uses at its peak stays with it until it
exits.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
OPT_OUT = "SEGMAMBA_KEEP_FREED_MEMORY"


def keep_freed_memory() -> str | None:
    """Apply the setting to this process; returns None when applied, else why it was not.

    Not applied when `SEGMAMBA_KEEP_FREED_MEMORY=0`, when the user already configures malloc
    through `GLIBC_TUNABLES`, or where the C library is not glibc.
    """
    if os.environ.get(OPT_OUT, "1") == "0":
        return f"{OPT_OUT}=0"
    if "GLIBC_TUNABLES" in os.environ:
        return "GLIBC_TUNABLES is set"
    if not sys.platform.startswith("linux"):
        return f"not glibc ({sys.platform})"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "no glibc mallopt"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Trim threshold -1: never trim. At most 0 mappings: every block comes from the heap (glibc's
    # mmap threshold, which cannot be set above 32 MiB, then no longer applies).
    if not (mallopt(_M_TRIM_THRESHOLD, -1) and mallopt(_M_MMAP_MAX, 0)):
        return "mallopt refused the setting"
    return None
