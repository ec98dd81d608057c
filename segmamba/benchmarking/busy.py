"""The main job beside a busy process: how much slower it runs, with and without our thread settings.

The workload is the main job itself, shortened: `python -m segmamba.train` with its default preset
(embedded tumour set, small SegMamba, 32^3 crops, one data-loader worker) for a few epochs, the
last one validated. Each run is a fresh process, timed from start to exit. A round runs every
configuration alone and beside one process that spins (`while True: pass`, pinned to one CPU
with `pin`), alone and busy in alternating order from round to round so that a drift of the
machine's load does not favour one side; the slowdown is the median over rounds of busy / alone.

Configurations:
    library   libgomp's defaults (threads spin-wait at the end of a parallel region) and torch's
              default thread count: what the main job did before segmamba.cpu_threads
    segmamba  the trainer's own settings (segmamba.cpu_threads: passive waiting when another process
              runs at its start, libgomp's default otherwise; each run chooses for itself)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from segmamba.cpu_threads import library_default_env, own_choice_env

CONFIGS = ("library", "segmamba")
# Shortened main job: two epochs of the preset's 30 steps, the second validated, on the main job's
# data set (generated into data/synthetic if not there yet). Quick (CI): one step on three coarse
# volumes generated into a temporary folder.
FULL_TRAIN_ARGS = ("--epochs", "2", "--val-every", "2")
QUICK_TRAIN_ARGS = ("--epochs", "1", "--iters-per-epoch", "1", "--val-every", "1", "--synth-cases", "3",
                    "--synth-spacing", "8")


def train_args(quick: bool, tmp: Path) -> list[str]:
    return [*QUICK_TRAIN_ARGS, "--synth-dir", str(tmp / "synthetic")] if quick else list(FULL_TRAIN_ARGS)


@dataclass
class BusyRun:
    """One timed trainer process. `seconds` is None when it failed (`note` says why)."""

    config: str
    busy: bool
    round: int
    seconds: float | None
    load_start: float
    note: str = ""


def start_spinner(pin_cpu: int | None) -> subprocess.Popen:
    """A process that keeps one CPU busy until killed (pinned to `pin_cpu` if given)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    if pin_cpu is not None:
        os.sched_setaffinity(proc.pid, {pin_cpu})
    return proc


def _env(config: str) -> dict[str, str]:
    if config not in CONFIGS:
        raise ValueError(f"config: expected one of {CONFIGS}, got {config!r}")
    return library_default_env(dict(os.environ)) if config == "library" else own_choice_env(dict(os.environ))


def run_trainer(config: str, args: Sequence[str], out: Path, timeout_s: float) -> tuple[float | None, str]:
    """Seconds from start to exit of `python -m segmamba.train ARGS --out OUT`, or (None, why)."""
    cmd = [sys.executable, "-m", "segmamba.train", *args, "--no-progress", "--out", str(out)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=_env(config), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"over {timeout_s:.0f} s"
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        return None, f"exit code {proc.returncode}: {tail[-1] if tail else ''}"
    return seconds, ""


def measure(configs: Sequence[str], rounds: int, *, quick: bool = False, pin: bool = False,
            timeout_s: float = 3600.0, on_run: Callable[[BusyRun], None] | None = None) -> list[BusyRun]:
    """Every configuration alone and beside a spinning process, `rounds` times (see the module doc).

    One untimed run first generates and caches the data set, so that no timed run pays for it.
    """
    runs: list[BusyRun] = []
    with tempfile.TemporaryDirectory(prefix="segmamba-busy-") as tmp:
        args = train_args(quick, Path(tmp))
        _, why = run_trainer("segmamba", args, Path(tmp) / "prepare", timeout_s)
        if why:
            raise RuntimeError(f"the untimed preparation run failed: {why}")
        for r in range(rounds):
            for config in configs:
                for busy in ((False, True) if r % 2 == 0 else (True, False)):
                    spinner = start_spinner(0 if pin else None) if busy else None
                    try:
                        time.sleep(0.5 if busy else 0.0)  # the spinner is running before the trainer starts
                        load = os.getloadavg()[0]
                        seconds, why = run_trainer(config, args, Path(tmp) / f"{config}-{busy}-{r}", timeout_s)
                    finally:
                        if spinner is not None:
                            spinner.kill()
                            spinner.wait()
                    runs.append(BusyRun(config, busy, r, seconds, load, why))
                    if on_run:
                        on_run(runs[-1])
    return runs


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summary(runs: Sequence[BusyRun]) -> dict[str, dict[str, float | None]]:
    """config -> median seconds alone, busy, and the median over rounds of busy / alone."""
    out = {}
    for config in dict.fromkeys(r.config for r in runs):
        mine = [r for r in runs if r.config == config and r.seconds is not None]
        alone = {r.round: r.seconds for r in mine if not r.busy}
        busy = {r.round: r.seconds for r in mine if r.busy}
        ratios = [busy[k] / alone[k] for k in alone if k in busy]
        out[config] = {"alone": _median(list(alone.values())), "busy": _median(list(busy.values())),
                       "slowdown": _median(ratios)}
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(runs: Sequence[BusyRun], meta: dict[str, str]) -> str:
    lines = ["# The main job beside a busy process", ""] + [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| configuration | alone s | beside a busy process s | slowdown (median busy / alone) |",
              "| --- | ---: | ---: | ---: |"]
    for config, s in summary(runs).items():
        lines.append(f"| {config} | {_fmt(s['alone'], '.1f')} | {_fmt(s['busy'], '.1f')} | "
                     f"{_fmt(s['slowdown'], '.2f')}x |")
    lines += ["", "Every run (load = 1-minute load average just before it started):", "",
              "| round | configuration | busy | seconds | load | note |", "| ---: | --- | --- | ---: | ---: | --- |"]
    for r in runs:
        lines.append(f"| {r.round} | {r.config} | {'yes' if r.busy else 'no'} | {_fmt(r.seconds, '.1f')} | "
                     f"{r.load_start:.2f} | {r.note} |")
    return "\n".join(lines) + "\n"
