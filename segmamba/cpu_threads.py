"""The OpenMP wait policy of CPU runs, set so that a busy machine does not slow them tenfold.

PyTorch's CPU ops, oneDNN, MKL and our own kernels (csrc/cpu) all run their parallel regions on
one libgomp thread team. By default a libgomp thread that finishes its share of a region first
spins (300,000 rounds of a pause instruction: milliseconds on recent x86 cores) waiting for its
siblings. When another process keeps a core busy, the sibling it waits for is often descheduled,
and the spinning thread burns its own core doing nothing, the very core the sibling could have
moved to; every one of the thousands of regions in a training step can pay that. Passive waiting
(`OMP_WAIT_POLICY=PASSIVE`: a thread with nothing to do sleeps at once) removes it.

libgomp reads its environment once, when it is loaded (by `import torch`), so entry points import
this module before torch: `python -m segmamba.train`, `segmamba.predict` and everything under
`segmamba.benchmarking` (`python -m segmamba.bench` and its measurement processes). A user's own
`OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` wins; `SEGMAMBA_CPU_TUNING=0` keeps libgomp's default.
:data:`WAIT_POLICY_NOTE` says what happened.

The thread count is left as torch sets it (one per core). Fewer threads when the machine is busy
measured worse, not better (benchmarks/RESULTS.md, "Busy machine"): with passive waiting the
synchronisation cost is gone, and the scheduler shares a contended CPU among threads, so a
process with fewer threads simply gets a smaller share of it.
"""

from __future__ import annotations

import os
import sys

OPT_OUT = "SEGMAMBA_CPU_TUNING"
POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# Set in the environment when this module chose the policy, so that child processes (the
# benchmarks' own "library defaults" runs) can tell our setting from the user's.
SET_BY_US = "SEGMAMBA_SET_OMP_WAIT_POLICY"


def tuning_enabled() -> bool:
    return os.environ.get(OPT_OUT, "1") != "0"


def _libgomp_loaded() -> bool:
    """Whether an OpenMP runtime is already mapped into this process (too late to configure it)."""
    if "torch" in sys.modules:
        return True
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line or "libiomp" in line for line in f)
    except OSError:
        return False


def set_wait_policy() -> str:
    """Ask libgomp for passive waiting if nobody chose a policy; returns what was done, for logs."""
    if not tuning_enabled():
        return f"OpenMP wait policy: library default ({OPT_OUT}=0)"
    chosen = {v: os.environ[v] for v in POLICY_VARS if v in os.environ}
    if chosen and os.environ.get(SET_BY_US) != "1":
        return "OpenMP wait policy: as set by the user (" + ", ".join(f"{k}={v}" for k, v in chosen.items()) + ")"
    if chosen:
        return "OpenMP wait policy: passive (OMP_WAIT_POLICY=PASSIVE, inherited)"
    if _libgomp_loaded():
        return "OpenMP wait policy: library default (torch was imported before segmamba could set it)"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ[SET_BY_US] = "1"
    return f"OpenMP wait policy: passive (OMP_WAIT_POLICY=PASSIVE; {OPT_OUT}=0 keeps the library default)"


def library_default_env(env: dict[str, str]) -> dict[str, str]:
    """A copy of `env` for a child process that must run with libgomp's own defaults (benchmarks)."""
    out = dict(env)
    if out.pop(SET_BY_US, None) == "1":
        for v in POLICY_VARS:
            out.pop(v, None)
    out[OPT_OUT] = "0"
    return out


def describe() -> str:
    """One log line: the wait policy and the intra-op thread count (torch must be importable)."""
    import torch

    return f"{WAIT_POLICY_NOTE}; {torch.get_num_threads()} compute threads"


WAIT_POLICY_NOTE = set_wait_policy()
