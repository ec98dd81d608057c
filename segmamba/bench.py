"""`python -m segmamba.bench`: SegMamba against transformer and CNN baselines, outside pytest.

Each (model, crop, mode) runs in a fresh interpreter (on CUDA one per (model, crop): its peak
counter resets exactly), so one model's memory cannot hide another's; combinations a model cannot
run (SwinUNETR needs sides that are multiples of 32) are marked in the table, and a model that
fails or runs out of time is marked too, never ending the run. Writes `<device>_models.md` (table,
machine, versions, date, kernel backend) and `<device>_models.png` (time and memory vs crop).

    python -m segmamba.bench                                   # CPU, crops 48 64 96, every model
    python -m segmamba.bench --crops 64 96 --repeats 3         # what benchmarks/results/cpu_models.md holds
    python -m segmamba.bench --device cuda --crops 128         # GPU, batch 2
    python -m segmamba.bench --quick                           # tiny configurations, seconds (CI)
    python -m segmamba.bench --profile --crops 96              # where SegMamba's training step spends its time
    python -m segmamba.bench --busy --rounds 3                 # the main job alone and beside a busy process
    python -m segmamba.bench --quality                         # Dice/HD95 of every model trained the same way
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from .benchmarking.busy import CONFIGS as BUSY_CONFIGS
from .benchmarking.quality import DEFAULT_SEEDS as QUALITY_SEEDS, QUALITY_MODELS
from .benchmarking.cases import MODES, Case, Result, run_isolated, unrunnable_reason
from .benchmarking.report import busy_warning, load_average, machine_info, write_outputs

DEFAULT_CROPS = {"cpu": (48, 64, 96), "cuda": (128,)}
DEFAULT_BATCH = {"cpu": 1, "cuda": 2}
# SwinUNETR is left out of the quick mode: its bottleneck is crop/32 voxels wide, instance norm needs
# more than one voxel to train, and at 64^3 even a tiny SwinUNETR takes tens of seconds per step here.
QUICK_CROP = 32
QUICK_MODELS = ("segmamba", "unetr")


def _model_names() -> tuple[str, ...]:
    from .models import MODEL_NAMES

    return tuple(MODEL_NAMES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m segmamba.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--crops", type=int, nargs="+", help="cube sides (default: 48 64 96 on CPU, 128 on CUDA)")
    p.add_argument("--models", nargs="+", help="model names (default: all; with --profile: segmamba)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch", type=int, help="batch size (default: 1 on CPU, 2 on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="stop repeating a case once its timed steps took this long (at least one is timed)")
    p.add_argument("--timeout", type=float,
                   help="seconds before a measuring process is killed (default 1200; --busy, --quality: 3600)")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds for the whole run; cases that would start later are marked 'skipped'")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the .md and .png")
    p.add_argument("--name", help="file stem of the outputs (default: <device>_models[_quick])")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny configurations of {', '.join(QUICK_MODELS)} at {QUICK_CROP}^3, one step (CI: proves it runs)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="every model in channels-last 3D memory format, as the trainer runs on CPU "
                        "(segmamba.models.channels_last; default: on for --device cpu, off for cuda)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every model (the first, warm-up step includes the compilation; its time is "
                        "reported)")
    p.add_argument("--profile", action="store_true",
                   help="instead of the comparison, print where a training step's time goes, stage by stage")
    b = p.add_argument_group("--busy: the main job alone and beside a process that keeps one CPU busy")
    b.add_argument("--busy", action="store_true", help="instead of the comparison, time the shortened main job "
                   "alone and beside a busy process (writes <device>_busy.md)")
    b.add_argument("--rounds", type=int, default=3, help="alone/busy pairs per configuration (default 3)")
    b.add_argument("--pin", action="store_true", help="pin the busy process to CPU 0 (default: the OS places it)")
    b.add_argument("--busy-configs", nargs="+", choices=BUSY_CONFIGS, default=list(BUSY_CONFIGS),
                   help="library: libgomp's and torch's defaults; segmamba: the trainer's (passive OpenMP "
                        "waiting if another process runs at its start)")
    q = p.add_argument_group("--quality: train, predict and score every model the same way (with --models, --quick)")
    q.add_argument("--quality", action="store_true", help="instead of the comparison, train each model on the "
                   "embedded set and score the test split (writes <device>_quality.md and .png)")
    q.add_argument("--seeds", type=int, nargs="+", default=list(QUALITY_SEEDS),
                   help=f"training seeds (default {' '.join(map(str, QUALITY_SEEDS))})")
    q.add_argument("--data", type=Path, help="the embedded set's folder (default data/synthetic, as the trainer; "
                   "generated if missing; with --quick a tiny set in a temporary folder)")
    args = p.parse_args(argv)
    if args.quality:
        args.models = args.models or list(QUALITY_MODELS)
        unknown = sorted(set(args.models) - set(QUALITY_MODELS))
        if unknown:
            p.error(f"--models: no quality configuration for {unknown}; expected names from {list(QUALITY_MODELS)}")
        if args.device != "cpu":
            p.error(f"--quality: trains on the CPU, expected --device cpu, got {args.device}")
    if args.quick:
        args.crops = args.crops or [QUICK_CROP]
        args.models = args.models or list(QUICK_MODELS)
        args.repeats, args.warmup = 1, 0
    args.crops = args.crops or list(DEFAULT_CROPS[args.device])
    args.models = args.models or (["segmamba"] if args.profile else list(_model_names()))
    args.batch = args.batch or DEFAULT_BATCH[args.device]
    args.timeout = args.timeout or (3600.0 if args.busy or args.quality else 1200.0)
    if args.channels_last is None:
        args.channels_last = args.device == "cpu"
    args.name = args.name or f"{args.device}_models" + ("_quick" if args.quick else "")
    unknown = sorted(set(args.models) - set(_model_names()))
    if unknown:
        p.error(f"--models: unknown {unknown}; expected names from {list(_model_names())}")
    if min(args.crops) < 1 or args.batch < 1 or args.repeats < 1 or args.rounds < 1:
        p.error(f"--crops, --batch, --repeats and --rounds must be positive, got {args.crops}, {args.batch}, "
                f"{args.repeats}, {args.rounds}")
    if args.compile and (args.profile or args.warmup < 1):
        p.error("--compile: needs --warmup >= 1 (the compilation is not timed) and cannot be profiled (--profile "
                "hooks every module)")
    if args.busy and args.device != "cpu":
        p.error(f"--busy: measures CPU contention, expected --device cpu, got {args.device}")
    return args


def plan(args: argparse.Namespace) -> list[list[Case]]:
    """Cases grouped by the process that measures them: one per case on CPU, one per (model, crop) on CUDA."""
    groups: list[list[Case]] = []
    for crop in args.crops:
        for model in args.models:
            cases = [Case(model, crop, mode, args.device, args.batch, args.repeats, args.warmup, args.quick,
                          args.max_seconds, args.channels_last, args.compile) for mode in args.modes]
            groups += [cases] if args.device == "cuda" else [[c] for c in cases]
    return groups


def run_comparison(args: argparse.Namespace, on_progress: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Measure every planned case; `on_progress(results so far)` runs after each process, so a run
    that is killed still leaves the table of what it measured."""
    results: list[Result] = []
    groups = plan(args)
    deadline = time.monotonic() + args.time_budget
    bar = tqdm(groups, desc="bench", unit="case", file=sys.stderr, disable=None)
    for group in bar:
        first = group[0]
        bar.set_postfix_str(f"{first.model} {first.crop}^3 {'+'.join(c.mode for c in group)}")
        reason = unrunnable_reason(first.model, first.crop)
        left = deadline - time.monotonic()
        if reason:
            results += [Result(c, "n/a", reason) for c in group]
        elif left < 1:
            results += [Result(c, "skipped", "time budget spent") for c in group]
        else:
            results += run_isolated(group, timeout_s=min(args.timeout * len(group), left))
        for r in results[-len(group):]:
            tqdm.write(f"{r.case.model} {r.case.crop}^3 {r.case.mode}: {r.status}"
                       + (f" {r.median_s:.3f} s, peak {r.peak_mb:,.0f} MB" if r.status == "ok" else f" ({r.note})"),
                       file=sys.stderr)
        if on_progress:
            on_progress(results)
    return results


def run_busy(args: argparse.Namespace, meta: dict[str, str]) -> int:
    from .benchmarking import busy

    meta["load average (1/5/15 min) at start"] = load_average()
    meta["busy process"] = "python -c 'while True: pass'" + (", pinned to CPU 0" if args.pin else ", placed by the OS")
    meta["workload"] = ("python -m segmamba.train " + " ".join(busy.train_args(args.quick, Path("TMP")))
                        + " (fresh process per run, timed start to exit)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.device}_busy{'_quick' if args.quick else ''}.md"

    def progress(run: busy.BusyRun) -> None:
        took = f"{run.seconds:.1f} s" if run.seconds is not None else f"failed ({run.note})"
        print(f"round {run.round} {run.config} {'busy ' if run.busy else 'alone'}: {took}, load {run.load_start:.2f}",
              file=sys.stderr, flush=True)

    runs = busy.measure(args.busy_configs, args.rounds, quick=args.quick, pin=args.pin, timeout_s=args.timeout,
                        on_run=progress)
    meta["load average (1/5/15 min) at the end"] = load_average()
    path.write_text(busy.markdown(runs, meta))
    print(path.read_text())
    return 0 if all(r.seconds is not None for r in runs) else 1


def run_quality(args: argparse.Namespace, meta: dict[str, str]) -> int:
    from .benchmarking import quality

    steps = (quality.QUICK["epochs"] * quality.QUICK["iters"] if args.quick
             else quality.EPOCHS * quality.ITERS_PER_EPOCH)
    meta["recipe"] = (f"python -m segmamba.train defaults (embedded tumour set, AdamW, Dice + CE, batch 2), crop "
                      f"{'x'.join(map(str, quality.ROI))}, {steps} optimiser steps, the same for every model; "
                      f"seeds {' '.join(map(str, args.seeds))}"
                      + (" (quick: tiny generated set)" if args.quick else ""))
    meta["test split"] = "the trainer's split.json (70/10/20, split seed 0), the model after the last step"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.device}_quality{'_quick' if args.quick else ''}"
    started = time.monotonic()

    def save(runs: list) -> None:
        meta["wall time so far"] = f"{(time.monotonic() - started) / 60:.1f} min"
        meta["load average (1/5/15 min) now"] = load_average()
        stem.with_suffix(".md").write_text(quality.markdown(runs, meta) + f"\n![Dice and HD95]({stem.name}.png)\n")
        quality.write_plot(runs, stem.with_suffix(".png"))

    runs: list = []

    def progress(run) -> None:
        runs.append(run)
        took = f", trained in {run.train_s:.0f} s" if run.train_s is not None else ""
        print(f"{run.model} seed {run.seed}: {run.status}{took}" + (f" ({run.note})" if run.note else ""),
              file=sys.stderr, flush=True)
        save(runs)

    meta["load average (1/5/15 min) at start"] = load_average()
    quality.measure(args.models, args.seeds, args.data, quick=args.quick, timeout_s=args.timeout,
                    time_budget_s=args.time_budget, on_run=progress)
    print(stem.with_suffix(".md").read_text())
    return 0 if any(r.status == "ok" for r in runs) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available here", file=sys.stderr)
            return 2
    warning = busy_warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if args.profile:
        from .benchmarking.stages import profile_report

        text = profile_report(args.models, args.crops, args.device, args.batch, tiny=args.quick,
                              channels_last=args.channels_last)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.device}_profile.md").write_text(text)
        return 0
    meta = machine_info(args.device)
    meta["command"] = "python -m segmamba.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    if warning:
        meta["**WARNING**"] = warning
    if args.busy:
        return run_busy(args, meta)
    if args.quality:
        return run_quality(args, meta)
    load_before = load_average()

    def save(results: list[Result]) -> tuple[Path, Path]:
        meta["load average (1/5/15 min) at start / now"] = f"{load_before}  /  {load_average()}"
        return write_outputs(results, meta, args.out, args.name)

    results = run_comparison(args, on_progress=save)
    md, png = save(results)
    print(md.read_text())
    print(f"wrote {md} and {png}", file=sys.stderr)
    failed = [r for r in results if r.status in ("error", "timeout")]
    return 1 if failed and len(failed) == len(results) else 0


def _exit_on_sigterm(signum, frame) -> None:
    # SystemExit unwinds through run_isolated, which kills the running case's process.
    sys.exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
