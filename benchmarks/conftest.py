"""The benchmarks run with the trainer's allocator setting (segmamba.host_memory), so that kernel
and model timings are those of a training process, not of glibc handing memory back to the OS
between rounds. `SEGMAMBA_KEEP_FREED_MEMORY=0` measures with glibc's defaults instead."""

from segmamba.host_memory import keep_freed_memory

_NOT_APPLIED = keep_freed_memory()


def pytest_report_header(config):
    if _NOT_APPLIED is None:
        return "malloc: freed memory kept for reuse (segmamba.host_memory)"
    return f"malloc: glibc defaults ({_NOT_APPLIED})"
