"""The benchmarks run with the trainer's process settings, so that kernel and model timings are those
of a training process: its OpenMP wait policy (segmamba.cpu_threads, set here before anything
imports torch; libgomp reads it once, when torch loads it) and its allocator setting
(segmamba.host_memory), so that glibc does not hand memory back to the OS between rounds.
`SEGMAMBA_CPU_TUNING=0` / `SEGMAMBA_KEEP_FREED_MEMORY=0` measure with the libraries' defaults instead."""

from segmamba.cpu_threads import WAIT_POLICY_NOTE
from segmamba.host_memory import keep_freed_memory

_NOT_APPLIED = keep_freed_memory()


def pytest_report_header(config):
    malloc = ("malloc: freed memory kept for reuse (segmamba.host_memory)" if _NOT_APPLIED is None
              else f"malloc: glibc defaults ({_NOT_APPLIED})")
    return [malloc, WAIT_POLICY_NOTE]
