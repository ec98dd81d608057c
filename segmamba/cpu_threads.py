"""The OpenMP wait policy of CPU runs: fast on a quiet machine, and not tenfold slower on a busy one.

PyTorch's CPU ops, oneDNN, MKL and our own kernels (csrc/cpu) all run their parallel regions on
one libgomp thread team. By default a libgomp thread that finishes its share of a region first
spins (300,000 rounds of a pause instruction: milliseconds on recent x86 cores) waiting for its
siblings. When another process keeps a core busy, the sibling it waits for is often descheduled,
and the spinning thread burns its own core doing nothing, the very core the sibling could have
moved to; every one of the thousands of regions in a training step can pay that. Passive waiting
(`OMP_WAIT_POLICY=PASSIVE`: a thread with nothing to do sleeps at once) removes it, but on a quiet
machine every region then pays a wake-up instead. Measured on the 2-core machine, the main job
shortened to two epochs (benchmarks/RESULTS.md): spinning 14.1-14.8 s alone, 36-38 s beside a
busy process; passive 19.6-21.6 s alone, 26.1-26.5 s beside it; short spins (`GOMP_SPINCOUNT`
3,000 or 30,000) were as bad as the default when busy.

So the policy is chosen when the process starts (`auto`, the default): passive when another
process is running at that moment (the kernel's count of runnable tasks, /proc/stat, sampled a few
times), libgomp's default otherwise. A machine that becomes busy later keeps the default.
`SEGMAMBA_CPU_TUNING=passive` always waits passively; `SEGMAMBA_CPU_TUNING=0` keeps libgomp's
default; a user's own `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` wins over all of them.

libgomp reads its environment once, when it is loaded (by `import torch`), so entry points import
this module before torch: `python -m segmamba.train`, `segmamba.predict` and everything under
`segmamba.benchmarking` (`python -m segmamba.bench` and its measurement processes).
:data:`WAIT_POLICY_NOTE` says what happened.

The thread count is left as torch sets it (one per core). Fewer threads when the machine is busy
measured worse, not better (benchmarks/RESULTS.md, "Busy machine"): with passive waiting the
synchronisation cost is gone, and the scheduler shares a contended CPU among threads, so a
process with fewer threads simply gets a smaller share of it.
"""

from __future__ import annotations

import os
import sys
import time

OPT_OUT = "SEGMAMBA_CPU_TUNING"
POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# Set in the environment when this module chose the policy, so that child processes (the
# benchmarks' own "library defaults" runs) can tell our setting from the user's.
SET_BY_US = "SEGMAMBA_SET_OMP_WAIT_POLICY"


MODES = {"1": "auto", "auto": "auto", "passive": "passive", "0": "off"}


def tuning_mode() -> str:
    """'auto', 'passive' or 'off', from SEGMAMBA_CPU_TUNING (unset = auto)."""
    value = os.environ.get(OPT_OUT, "auto")
    if value not in MODES:
        raise ValueError(f"{OPT_OUT}: expected one of {sorted(MODES)}, got {value!r}")
    return MODES[value]


def other_runnable_tasks(samples: int = 5, interval_s: float = 0.01, stat: str = "/proc/stat") -> int | None:
    """How many tasks besides this one the kernel counts as runnable, the least over `samples`
    readings (so a task that runs for an instant is not counted); None where it cannot be read."""
    counts = []
    for i in range(samples):
        try:
            with open(stat) as f:
                line = next((l for l in f if l.startswith("procs_running ")), None)
        except OSError:
            return None
        if line is None:
            return None
        counts.append(int(line.split()[1]) - 1)  # this process is running while it reads
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0, min(counts))


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
    """Choose the wait policy if nobody did (module doc); returns what was done, for logs."""
    mode = tuning_mode()
    if mode == "off":
        return f"OpenMP wait policy: library default ({OPT_OUT}=0)"
    chosen = {v: os.environ[v] for v in POLICY_VARS if v in os.environ}
    if chosen and os.environ.get(SET_BY_US) != "1":
        return "OpenMP wait policy: as set by the user (" + ", ".join(f"{k}={v}" for k, v in chosen.items()) + ")"
    if chosen:
        return "OpenMP wait policy: passive (OMP_WAIT_POLICY=PASSIVE, inherited)"
    if _libgomp_loaded():
        return "OpenMP wait policy: library default (torch was imported before segmamba could set it)"
    if mode == "auto":
        others = other_runnable_tasks()
        if others == 0:
            return (f"OpenMP wait policy: library default (no other process running at start; "
                    f"{OPT_OUT}=passive if the machine will be busy)")
        why = "another process running at start" if others else "cannot tell whether the machine is busy"
    else:
        why = f"{OPT_OUT}=passive"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ[SET_BY_US] = "1"
    return f"OpenMP wait policy: passive (OMP_WAIT_POLICY=PASSIVE: {why}; {OPT_OUT}=0 keeps the library default)"


def own_choice_env(env: dict[str, str]) -> dict[str, str]:
    """A copy of `env` without the policy this module set, so that a child process (a benchmark's
    measured run) chooses for itself, as a freshly started trainer would."""
    out = dict(env)
    if out.pop(SET_BY_US, None) == "1":
        for v in POLICY_VARS:
            out.pop(v, None)
    return out


def library_default_env(env: dict[str, str]) -> dict[str, str]:
    """A copy of `env` for a child process that must run with libgomp's own defaults (benchmarks)."""
    return {**own_choice_env(env), OPT_OUT: "0"}


def describe() -> str:
    """One log line: the wait policy and the intra-op thread count (torch must be importable)."""
    import torch

    return f"{WAIT_POLICY_NOTE}; {torch.get_num_threads()} compute threads"


WAIT_POLICY_NOTE = set_wait_policy()
