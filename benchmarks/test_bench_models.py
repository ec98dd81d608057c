"""SegMamba against UNETR, SwinUNETR, SwinUNETR-V2, SegResNet and MedNeXt (4 channels in, 4 labels out).

Each case times an inference forward or one training step (forward, cross-entropy, backward, SGD
step) with pytest-benchmark, and records in `extra_info` the parameter count, the kernel backend
and the peak memory: CUDA's max allocated on a GPU; on CPU the peak resident memory of a fresh
process running the same case (segmamba.benchmarking.cases.run_isolated), so that one model's
allocations cannot hide another's.

    pytest benchmarks/test_bench_models.py --benchmark-only                      # full suite
    SEGMAMBA_BENCH_QUICK=1 pytest benchmarks/test_bench_models.py --benchmark-only   # CI, seconds
    SEGMAMBA_BENCH_DEVICE=cpu pytest ...                                          # force CPU on a GPU machine
    SEGMAMBA_BENCH_CHANNELS_LAST=0 pytest ...     # NCDHW (default: channels-last on CPU, as the trainer)

Full suite: every model at crops 48^3, 64^3, 96^3 with batch 1 on CPU (about an hour on 2 cores:
MedNeXt's training step alone takes minutes at 96^3), 128^3 with batch 2 on CUDA; 3 rounds after
one warm-up. Quick mode (CI): tiny SegMamba and UNETR at 32^3, one round, no warm-up.
Combinations a model cannot run (SwinUNETR at 48^3) are skipped with the reason.
`python -m segmamba.bench` runs the same comparison outside pytest and writes the report table.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from segmamba.bench import QUICK_CROP, QUICK_MODELS
from segmamba.benchmarking.cases import MODES, Case, build, prepare, run_isolated, scan_backend, unrunnable_reason
from segmamba.models import MODEL_NAMES

QUICK = os.environ.get("SEGMAMBA_BENCH_QUICK", "0") == "1"
DEVICE = os.environ.get("SEGMAMBA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 2 if DEVICE == "cuda" else 1
CROPS = (QUICK_CROP,) if QUICK else ((128,) if DEVICE == "cuda" else (48, 64, 96))
MODELS = QUICK_MODELS if QUICK else MODEL_NAMES
# Every model in the memory format the trainer uses on this device (segmamba.models.channels_last).
CHANNELS_LAST = os.environ.get("SEGMAMBA_BENCH_CHANNELS_LAST", "1" if DEVICE == "cpu" else "0") == "1"
ROUNDS = 1 if QUICK else 3
WARMUP = 0 if QUICK else 1
MEMORY_TIMEOUT_S = 300 if QUICK else 1800


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("crop", CROPS)
@pytest.mark.parametrize("model_name", MODELS)
def test_model_step(benchmark, model_name: str, crop: int, mode: str) -> None:
    reason = unrunnable_reason(model_name, crop)
    if reason:
        pytest.skip(f"{model_name} at {crop}^3: {reason}")
    case = Case(model_name, crop, mode, DEVICE, BATCH, repeats=ROUNDS, tiny=QUICK, channels_last=CHANNELS_LAST)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = build(case)
    step = prepare(case, model)
    benchmark.group = f"models {mode} {crop}^3"
    benchmark.extra_info.update(model=model_name, crop=crop, mode=mode, batch=BATCH, tiny=QUICK,
                                channels_last=CHANNELS_LAST, params=sum(p.numel() for p in model.parameters()),
                                backend=scan_backend(DEVICE))
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    if DEVICE == "cuda":
        benchmark.extra_info["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return
    del model, step
    # Memory needs a process of its own (see the module doc); one untimed step is enough for a peak.
    isolated = run_isolated([dataclasses.replace(case, repeats=1, warmup=0)], timeout_s=MEMORY_TIMEOUT_S)[0]
    assert isolated.status == "ok", f"memory run of {case}: {isolated.status}: {isolated.note}"
    benchmark.extra_info.update(peak_rss_mb=isolated.peak_mb, idle_rss_mb=isolated.idle_mb)
