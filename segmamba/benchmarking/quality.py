"""Segmentation quality of SegMamba, its no-Mamba control and the baselines, all trained the same way.

    python -m segmamba.bench --quality                   # 6 models x 3 seeds (benchmarks/results/cpu_quality.md)
    python -m segmamba.bench --quality --quick           # 1 step each on a tiny generated set (CI)

Each (model, seed) is trained by the trainer, `python -m segmamba.train` (the main job's data: the
embedded tumour set; its recipe: AdamW, Dice + cross-entropy, poly LR, clipping, batch 2), with one
crop for every model and the same number of optimiser steps; the model after the last step then
segments the held-out test split (`python -m segmamba.predict --split RUN/split.json --subset
test`) and `python -m segmamba.evaluate` scores it. Every model runs at a small configuration of
about one to four million parameters (`SMALL_CONFIGS`, listed in the table). The control,
`segmamba_nomamba`, is SegMamba with every Mamba layer replaced by the identity: if it scores
like SegMamba, the scans add nothing on this task ("nnU-Net Revisited", Isensee et al. 2024,
found exactly that for U-Mamba on BraTS).

Full mode runs each command in a fresh process (time from start to exit; peak resident memory of
the training process from wait4, its data-loader worker not included). Quick mode calls the same
`main(argv)` functions in this process, so it takes seconds, and has no per-model memory.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

QUALITY_MODELS = ("segmamba", "segmamba_nomamba", "unetr", "swinunetr", "segresnet", "mednext")
CONTROL, REFERENCE = "segmamba_nomamba", "segmamba"
# About 1-4 M parameters each. SegMamba's is the main job's; SwinUNETR cannot go smaller (its
# feature size must be a multiple of 12 and it has a 16x-wide bottleneck block).
SMALL_CONFIGS: dict[str, dict] = {
    "segmamba": {"feat_size": [8, 16, 32, 64], "hidden_size": 64, "depths": [1, 1, 1, 1]},
    "segmamba_nomamba": {"feat_size": [8, 16, 32, 64], "hidden_size": 64},
    "unetr": {"feature_size": 8, "hidden_size": 64, "mlp_dim": 128, "num_heads": 4},
    "swinunetr": {"feature_size": 12, "depths": [1, 1, 1, 1]},
    "segresnet": {"init_filters": 8},
    "mednext": {"init_filters": 12},
}
# SwinUNETR needs sides that are multiples of 32 and one of at least 64; the brain of the embedded
# set at 3 mm is about 50 x 60 x 50 voxels, so this crop takes about half of it.
ROI = (32, 64, 32)
EPOCHS, ITERS_PER_EPOCH = 10, 30  # 300 optimiser steps, validated once at the end
DEFAULT_SEEDS = (0, 1, 2)
QUICK = {"epochs": 1, "iters": 1, "synth": ["--synth-cases", "5", "--synth-spacing", "8"]}


@dataclass
class QualityRun:
    """One (model, seed): status 'ok', 'error' or 'skipped'; `scores` maps e.g. 'Dice_WT' to the test mean."""

    model: str
    seed: int
    status: str
    note: str = ""
    params: int | None = None
    train_s: float | None = None
    peak_mb: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    n_cases: int = 0


def param_count(model: str) -> int:
    from segmamba.models import build_model, model_config

    net = build_model(**model_config(model, roi_size=ROI, **SMALL_CONFIGS[model]))
    return sum(p.numel() for p in net.parameters())


def _wait(proc: subprocess.Popen, timeout_s: float) -> tuple[int | None, float]:
    """(exit code or None on timeout, peak resident MB) of a child, from wait4."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024
        if time.monotonic() > deadline:
            proc.kill()
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            return None, usage.ru_maxrss / 1024
        time.sleep(0.2)


def run_cli(module: str, argv: list[str], log: Path, *, isolated: bool, timeout_s: float
            ) -> tuple[int | None, float, float | None]:
    """Run `python -m MODULE ARGV` (a fresh process, output to `log`) or MODULE.main(ARGV) in this
    process. Returns (exit code, None on timeout; seconds; peak resident MB of the process or None)."""
    start = time.perf_counter()
    if not isolated:
        rc = importlib.import_module(module).main(argv)
        return rc, time.perf_counter() - start, None
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=out, stderr=subprocess.STDOUT)
        try:
            rc, peak = _wait(proc, timeout_s)
        except BaseException:  # interrupted: never leave a training process running on its own
            proc.kill()
            raise
    return rc, time.perf_counter() - start, peak


def read_scores(csv_path: Path) -> tuple[dict[str, float], int]:
    """Mean over cases of every metric column ('Dice_WT', 'HD95_ET', ...) of evaluate's per-case CSV."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path}: no scored case")
    cols = [c for c in rows[0] if c.split("_", 1)[0] in ("Dice", "HD95")]
    return {c: statistics.fmean(float(r[c]) for r in rows) for c in cols}, len(rows)


def _tail(log: Path) -> str:
    try:
        lines = log.read_text().strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def train_argv(model: str, seed: int, run_dir: Path, data_dir: Path, quick: bool) -> list[str]:
    epochs, iters = (QUICK["epochs"], QUICK["iters"]) if quick else (EPOCHS, ITERS_PER_EPOCH)
    return ["--model", model, "--model-args", json.dumps(SMALL_CONFIGS[model]), "--roi", *map(str, ROI),
            "--epochs", str(epochs), "--iters-per-epoch", str(iters), "--val-every", str(epochs),
            "--seed", str(seed), "--synth-dir", str(data_dir), "--out", str(run_dir), "--no-progress",
            *(QUICK["synth"] if quick else [])]


def run_one(model: str, seed: int, work: Path, data_dir: Path, *, quick: bool, timeout_s: float) -> QualityRun:
    """Train, predict the test split and score one (model, seed); failures are recorded, not raised."""
    run = QualityRun(model, seed, "error", params=param_count(model))
    run_dir = work / f"{model}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = [
        ("segmamba.train", train_argv(model, seed, run_dir, data_dir, quick)),
        ("segmamba.predict", ["--checkpoint", str(run_dir / "last.pt"), "--input", str(data_dir),
                              "--split", str(run_dir / "split.json"), "--subset", "test",
                              "--out", str(run_dir / "test"), "--device", "cpu", "--no-progress"]),
        ("segmamba.evaluate", ["--pred", str(run_dir / "test"), "--ref", str(data_dir),
                               "--csv", str(run_dir / "scores.csv"), "--no-progress"]),
    ]
    for module, argv in steps:
        log = run_dir / f"{module.split('.')[-1]}.log"
        rc, seconds, peak = run_cli(module, argv, log, isolated=not quick, timeout_s=timeout_s)
        if module == "segmamba.train":
            run.train_s, run.peak_mb = seconds, peak
        if rc != 0:
            run.note = f"{module}: " + (f"over {timeout_s:.0f} s" if rc is None else f"exit code {rc}: {_tail(log)}")
            return run
    run.scores, run.n_cases = read_scores(run_dir / "scores.csv")
    run.status = "ok"
    return run


def prepare(run_dir: Path, data_dir: Path, *, timeout_s: float) -> None:
    """One untimed training step, so that generating and caching the data set is in no model's time."""
    run_dir.mkdir(parents=True)
    argv = train_argv(REFERENCE, 0, run_dir, data_dir, quick=False)
    argv[argv.index("--epochs") + 1] = argv[argv.index("--iters-per-epoch") + 1] = "1"
    argv[argv.index("--val-every") + 1] = "1"
    log = run_dir / "train.log"
    rc, _, _ = run_cli("segmamba.train", argv, log, isolated=True, timeout_s=timeout_s)
    if rc != 0:
        raise RuntimeError(f"preparing the data set with segmamba.train failed ({rc}): {_tail(log)}")


def measure(models: Sequence[str], seeds: Sequence[int], data_dir: Path | None, *, quick: bool = False,
            timeout_s: float = 7200.0, time_budget_s: float = float("inf"),
            on_run: Callable[[QualityRun], None] | None = None) -> list[QualityRun]:
    """Every model for every seed, seed by seed (a run stopped early still compares whole seeds).

    `data_dir` None: the main job's data set (data/synthetic, generated by the first training if
    missing); in quick mode a tiny set generated into a temporary folder.
    """
    unknown = sorted(set(models) - set(SMALL_CONFIGS))
    if unknown:
        raise ValueError(f"models: no small configuration for {unknown}; expected names from {list(SMALL_CONFIGS)}")
    runs: list[QualityRun] = []
    deadline = time.monotonic() + time_budget_s
    with tempfile.TemporaryDirectory(prefix="segmamba-quality-") as tmp:
        data = data_dir or (Path(tmp) / "synthetic" if quick else Path("data/synthetic"))
        if not quick:  # quick mode has no timing to protect
            prepare(Path(tmp) / "prepare", data, timeout_s=timeout_s)
        for seed in seeds:
            for model in models:
                if time.monotonic() > deadline:
                    run = QualityRun(model, seed, "skipped", "time budget spent")
                else:
                    run = run_one(model, seed, Path(tmp), data, quick=quick, timeout_s=timeout_s)
                runs.append(run)
                if on_run:
                    on_run(run)
    return runs


def _stats(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float], spec: str) -> str:
    s = _stats(values)
    if s is None:
        return "-"
    return format(s[0], spec) + (f" ± {format(s[1], spec)}" if len(values) > 1 else "")


def score_columns(runs: Sequence[QualityRun]) -> list[str]:
    """Dice columns, then HD95 columns, in evaluate's order (e.g. Dice_WT, Dice_TC, Dice_ET, HD95_WT, ...)."""
    cols = list(dict.fromkeys(c for r in runs for c in r.scores))
    return [c for c in cols if c.startswith("Dice_")] + [c for c in cols if c.startswith("HD95_")]


def per_model(runs: Sequence[QualityRun]) -> dict[str, list[QualityRun]]:
    out: dict[str, list[QualityRun]] = {}
    for r in runs:
        out.setdefault(r.model, []).append(r)
    return out


def _mean_dice(run: QualityRun) -> float:
    dice = [v for k, v in run.scores.items() if k.startswith("Dice_")]
    return statistics.fmean(dice)


def control_line(runs: Sequence[QualityRun]) -> str | None:
    """SegMamba minus its no-Mamba control in mean Dice, paired by seed."""
    ok = {(r.model, r.seed): r for r in runs if r.status == "ok"}
    diffs = [_mean_dice(ok[(REFERENCE, s)]) - _mean_dice(ok[(CONTROL, s)])
             for (m, s) in ok if m == REFERENCE and (CONTROL, s) in ok]
    if not diffs:
        return None
    mean, sd = _stats(diffs)
    spread = f" ± {sd:.3f} (std over {len(diffs)} seeds)" if len(diffs) > 1 else " (one seed)"
    return (f"Mamba layers' effect: mean Dice of {REFERENCE} minus {CONTROL}, paired by seed: {mean:+.3f}{spread}. "
            f"Within about one std of 0 means the scans add nothing measurable at this budget.")


def markdown(runs: Sequence[QualityRun], meta: dict[str, str]) -> str:
    cols = score_columns(runs)
    lines = ["# Segmentation quality: SegMamba, its no-Mamba control and the baselines", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["- scores: mean over the test cases of each seed, then mean ± std over seeds; HD95 in mm "
              "(segmamba.evaluate's conventions); train s: the training process from start to exit "
              "(start-up and the final validation included); peak MB: its peak resident memory",
              "", "| model | params (M) | seeds | " + " | ".join(c.replace("_", " ") for c in cols)
              + " | train s | peak MB |",
              "| --- | ---: | ---: | " + " | ".join("---:" for _ in cols) + " | ---: | ---: |"]
    notes: list[str] = []
    for model, mine in per_model(runs).items():
        ok = [r for r in mine if r.status == "ok"]
        for r in mine:
            if r.status != "ok":
                notes.append(f"{model}, seed {r.seed}: {r.status}" + (f": {r.note}" if r.note else ""))
        params = next((r.params for r in mine if r.params), None)
        cells = [f"{params / 1e6:.2f}" if params else "-", str(len(ok))]
        cells += [_cell([r.scores[c] for r in ok if c in r.scores], ".3f" if c.startswith("Dice") else ".1f")
                  for c in cols]
        cells += [_cell([r.train_s for r in ok if r.train_s is not None], ".0f"),
                  _cell([r.peak_mb for r in ok if r.peak_mb is not None], ",.0f")]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if (line := control_line(runs)):
        lines += ["", line]
    if notes:
        lines += ["", "Runs that did not finish:", ""] + [f"- {n}" for n in notes]
    lines += ["", "Small configurations (registry overrides, `segmamba.models.build_model`):", ""]
    lines += [f"- {m}: `{json.dumps(SMALL_CONFIGS[m])}`" + (" (SegMamba's, without the Mamba layers)"
                                                           if m == CONTROL else "")
              for m in per_model(runs)]
    return "\n".join(lines) + "\n"


def write_plot(runs: Sequence[QualityRun], path: Path) -> None:
    """Dice and HD95 per region, one group of bars per model, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = score_columns(runs)
    groups = per_model(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for ax, metric in zip(axes, ("Dice", "HD95")):
        mine = [c for c in cols if c.startswith(metric + "_")]
        width = 0.8 / max(1, len(mine))
        for j, col in enumerate(mine):
            stats = [_stats([r.scores[col] for r in rs if r.status == "ok" and col in r.scores])
                     for rs in groups.values()]
            xs = [i + (j - (len(mine) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(xs, [s[0] if s else 0 for s in stats], width, yerr=[s[1] if s else 0 for s in stats],
                   label=col.split("_", 1)[1], capsize=2)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(list(groups), rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(metric + (" (mm, lower is better)" if metric == "HD95" else " (higher is better)"))
        ax.grid(True, axis="y", alpha=0.3)
        if mine:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
