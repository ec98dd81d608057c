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
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from .benchmarking.cases import MODES, Case, Result, run_isolated, unrunnable_reason
from .benchmarking.report import load_average, machine_info, write_outputs

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
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds before a case's process is killed")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds for the whole run; cases that would start later are marked 'skipped'")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the .md and .png")
    p.add_argument("--name", help="file stem of the outputs (default: <device>_models[_quick])")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny configurations of {', '.join(QUICK_MODELS)} at {QUICK_CROP}^3, one step (CI: proves it runs)")
    p.add_argument("--profile", action="store_true",
                   help="instead of the comparison, print where a training step's time goes, stage by stage")
    args = p.parse_args(argv)
    if args.quick:
        args.crops = args.crops or [QUICK_CROP]
        args.models = args.models or list(QUICK_MODELS)
        args.repeats, args.warmup = 1, 0
    args.crops = args.crops or list(DEFAULT_CROPS[args.device])
    args.models = args.models or (["segmamba"] if args.profile else list(_model_names()))
    args.batch = args.batch or DEFAULT_BATCH[args.device]
    args.name = args.name or f"{args.device}_models" + ("_quick" if args.quick else "")
    unknown = sorted(set(args.models) - set(_model_names()))
    if unknown:
        p.error(f"--models: unknown {unknown}; expected names from {list(_model_names())}")
    if min(args.crops) < 1 or args.batch < 1 or args.repeats < 1:
        p.error(f"--crops, --batch and --repeats must be positive, got {args.crops}, {args.batch}, {args.repeats}")
    return args


def plan(args: argparse.Namespace) -> list[list[Case]]:
    """Cases grouped by the process that measures them: one per case on CPU, one per (model, crop) on CUDA."""
    groups: list[list[Case]] = []
    for crop in args.crops:
        for model in args.models:
            cases = [Case(model, crop, mode, args.device, args.batch, args.repeats, args.warmup, args.quick,
                          args.max_seconds) for mode in args.modes]
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available here", file=sys.stderr)
            return 2
    if args.profile:
        from .benchmarking.stages import profile_report

        text = profile_report(args.models, args.crops, args.device, args.batch, tiny=args.quick)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.device}_profile.md").write_text(text)
        return 0
    meta = machine_info(args.device)
    meta["command"] = "python -m segmamba.bench " + " ".join(sys.argv[1:] if argv is None else argv)
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
