"""One benchmark case: a model at one crop, timed for inference or one training step, with peak memory.

A case runs in-process (`prepare` for pytest-benchmark, `measure` for a full measurement) or in a
fresh interpreter (`run_isolated`), which is how the CLI and the CPU memory numbers run it: the
peak resident memory of a process only ever grows, and memory an earlier model freed stays in the
allocator's pools, so one process per case is the only way one model's allocations cannot hide
another's. The child is `python -m segmamba.benchmarking.cases CASES_JSON` and prints one
`RESULT_TAG`-prefixed JSON line per case.

Peak memory: on CPU the peak resident set (ru_maxrss) of the whole process, interpreter and
libraries included (`idle_mb` is the resident set just before the first timed step, so
`peak_mb - idle_mb` is what the step itself adds); on CUDA `torch.cuda.max_memory_allocated`,
reset before the model is built, so it counts weights, optimiser state and activations.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

MODES = ("infer", "train")
RESULT_TAG = "SEGMAMBA_BENCH_RESULT "
IN_CHANS = OUT_CHANS = 4  # BraTS: four MRI modalities in, labels 0..3 out

# Small configurations for the quick mode (CI): same code paths, a fraction of the work.
TINY_OVERRIDES: dict[str, dict] = {
    "segmamba": {"feat_size": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "hidden_size": 64},
    "segmamba_nomamba": {"feat_size": (8, 16, 32, 64), "hidden_size": 64},
    "unetr": {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 2},
    "swinunetr": {"feature_size": 12, "depths": (1, 1, 1, 1)},
    "swinunetr_v2": {"feature_size": 12, "depths": (1, 1, 1, 1)},
    "segresnet": {"init_filters": 8},
    "mednext": {"init_filters": 8, "blocks_down": (1, 1, 1, 1), "blocks_bottleneck": 1, "blocks_up": (1, 1, 1, 1)},
}


@dataclass(frozen=True)
class Case:
    """What to measure. `max_seconds` stops the repeats early once timed steps took that long."""

    model: str
    crop: int
    mode: str
    device: str = "cpu"
    batch: int = 1
    repeats: int = 3
    warmup: int = 1
    tiny: bool = False
    max_seconds: float = 120.0
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {self.device!r}")
        for name in ("crop", "batch", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup: expected >= 0, got {self.warmup!r}")


@dataclass
class Result:
    """What a case measured. status: 'ok', 'n/a' (cannot run at this size), 'error', 'timeout' or 'skipped'."""

    case: Case
    status: str
    note: str = ""
    params: int | None = None
    times_s: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    idle_mb: float | None = None
    backend: str | None = None
    first_s: float | None = None  # the first (warm-up) step: with --compile, the compilation

    @property
    def median_s(self) -> float | None:
        if not self.times_s:
            return None
        t = sorted(self.times_s)
        mid = len(t) // 2
        return t[mid] if len(t) % 2 else 0.5 * (t[mid - 1] + t[mid])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Result":
        d = json.loads(text)
        d["case"] = Case(**d["case"])
        return cls(**d)


def unrunnable_reason(model: str, crop: int) -> str | None:
    """Why `model` cannot run on a crop**3 input (e.g. 'needs multiple of 32'), or None."""
    from segmamba.models import roi_size_error

    return roi_size_error(model, (crop,) * 3)


def build(case: Case) -> torch.nn.Module:
    from segmamba.models import build_model

    overrides = TINY_OVERRIDES.get(case.model, {}) if case.tiny else {}
    return build_model(case.model, in_chans=IN_CHANS, out_chans=OUT_CHANS, roi_size=(case.crop,) * 3, **overrides)


def scan_backend(device: str) -> str:
    """The selective-scan backend `auto` resolves to on `device` (what the SegMamba numbers ran on)."""
    from segmamba_kernels.dispatch import resolve_backend

    return resolve_backend("auto", torch.device(device))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prepare(case: Case, model: torch.nn.Module) -> Callable[[], None]:
    """A function running one synchronous inference forward or training step of `model` for `case`.

    The training step is what the public SegMamba recipe does per iteration: cross-entropy on four
    exclusive labels, backward, SGD (lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5).
    """
    dev = torch.device(case.device)
    model.to(dev)
    gen = torch.Generator().manual_seed(0)
    shape = (case.batch, IN_CHANS) + (case.crop,) * 3
    x = torch.randn(shape, generator=gen).to(dev)
    if case.channels_last:
        from segmamba.models.channels_last import CHANNELS_LAST, to_channels_last

        to_channels_last(model)
        x = x.contiguous(memory_format=CHANNELS_LAST)  # once here, not by the model's hook in every step
    if case.compile:
        # Parameters stay shared with `model`, so the optimiser below updates the compiled module's.
        model = torch.compile(model)
    if case.mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                model(x)
            _sync(case.device)

        return step

    model.train()
    target = torch.randint(0, OUT_CHANS, (case.batch,) + (case.crop,) * 3, generator=gen).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()
        _sync(case.device)

    return step


def rss_mb() -> float:
    """Current resident set of this process in MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set of this process so far in MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(case: Case) -> Result:
    """Build the model, run `case.warmup` untimed and up to `case.repeats` timed steps in this process."""
    reason = unrunnable_reason(case.model, case.crop)
    if reason:
        return Result(case, "n/a", reason)
    if case.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = build(case)
    params = sum(p.numel() for p in model.parameters())
    step = prepare(case, model)
    idle = rss_mb() if case.device == "cpu" else torch.cuda.memory_allocated() / 2**20
    first = None
    for i in range(case.warmup):
        start = time.perf_counter()
        step()
        if i == 0:
            first = time.perf_counter() - start
    times: list[float] = []
    while len(times) < case.repeats and sum(times) < case.max_seconds:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_rss_mb() if case.device == "cpu" else torch.cuda.max_memory_allocated() / 2**20
    return Result(case, "ok", params=params, times_s=times, peak_mb=peak, idle_mb=idle,
                  backend=scan_backend(case.device), first_s=first)


def _measure_safely(case: Case) -> Result:
    try:
        return measure(case)
    except torch.OutOfMemoryError as e:
        return Result(case, "error", f"out of memory: {str(e).splitlines()[0]}")
    except Exception as e:  # one broken model must not end the comparison; the note says what broke
        return Result(case, "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def run_isolated(cases: list[Case], timeout_s: float) -> list[Result]:
    """Measure `cases` in one fresh interpreter, in order (one case per call on CPU: see the module doc).

    A child that runs past `timeout_s` is killed; the cases it had not reported are marked 'timeout'.
    """
    payload = json.dumps([dataclasses.asdict(c) for c in cases])
    cmd = [sys.executable, "-m", "segmamba.benchmarking.cases", payload]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
            stderr, rc = f"killed after {timeout_s:.0f} s", None
        except BaseException:  # interrupted or terminated: never leave a child computing on its own
            proc.kill()
            raise
    done = [Result.from_json(line[len(RESULT_TAG):]) for line in stdout.splitlines() if line.startswith(RESULT_TAG)]
    missing = cases[len(done):]
    if rc is None:
        return done + [Result(c, "timeout", f"over {timeout_s:.0f} s") for c in missing]
    if missing:
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        why = f"killed by signal {-rc} (out of memory?)" if rc < 0 else f"exit code {rc}: {tail}"
        return done + [Result(c, "error", why) for c in missing]
    return done


def _child_main(payload: str) -> None:
    cases = [Case(**d) for d in json.loads(payload)]
    for case in cases:
        result = _measure_safely(case)
        print(RESULT_TAG + result.to_json(), flush=True)
        gc.collect()
        if case.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    _child_main(sys.argv[1])
