"""The benchmark tools end to end on CPU: `python -m segmamba.bench --quick`, the report's tables,
the stage profiler, `benchmarks/gpu_kernels.py --quick --device cpu` (the GPU check script's
kernel timing, run here on tiny shapes so that it is tested code), the quality comparison
(`--quality --quick`), the busy-machine benchmark's pieces and the OpenMP wait policy."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

from segmamba.bench import QUICK_CROP, main
from segmamba.benchmarking import busy as busy_bench
from segmamba.benchmarking.busy import start_spinner
from segmamba.benchmarking.cases import Case, Result, scan_backend
from segmamba.benchmarking.quality import QUALITY_MODELS, QualityRun
from segmamba.benchmarking.quality import SMALL_CONFIGS as QUALITY_CONFIGS
from segmamba.benchmarking.quality import markdown as quality_markdown
from segmamba.benchmarking.report import busy_warning, markdown_table
from segmamba.benchmarking.stages import profile_model
from segmamba.cpu_threads import library_default_env, own_choice_env
from segmamba.models import build_model, model_config

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _table_rows(md: str) -> dict[str, list[str]]:
    """First column -> cells of each data row of the first table."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and not line.startswith("| ---") and cells[0] not in rows:
            rows[cells[0]] = cells
    return rows


def test_bench_cli_quick_writes_table_and_plot(tmp_path: Path) -> None:
    # SegMamba alone: one process per mode is what costs time here; the table logic for several
    # models is checked on synthetic results below.
    proc = _run(["-m", "segmamba.bench", "--quick", "--models", "segmamba", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "cpu_models_quick.md").read_text()
    assert "- torch: " in md and "- monai: " in md and "- kernel backend: " in md and "- date: " in md
    rows = _table_rows(md)
    _, crop, params, infer_s, train_s, peak_infer, peak_train = row = rows["segmamba"]
    assert crop == f"{QUICK_CROP}³"
    assert float(params) > 0 and float(infer_s) > 0 and float(train_s) > 0, row
    # A process holding torch and a model resides in well over 100 MB; a training step needs more than inference.
    assert 100 < float(peak_infer.replace(",", "")) <= float(peak_train.replace(",", "")) * 1.05, row
    image = matplotlib.image.imread(tmp_path / "cpu_models_quick.png")
    assert image.shape[0] > 100 and image.shape[1] > 300 and image.std() > 0


def test_unrunnable_combination_is_marked_not_run(tmp_path: Path) -> None:
    # SwinUNETR needs sides that are multiples of 32: 48^3 must be marked in the table, not crash.
    assert main(["--models", "swinunetr", "--crops", "48", "--out", str(tmp_path), "--name", "t"]) == 0
    md = (tmp_path / "t.md").read_text()
    row = _table_rows(md)["swinunetr"]
    assert row[3] == row[4] == "n/a [1]", row
    assert re.search(r"^- \[1\] n/a: .*multiples of 32", md, re.M), md


def _ok(model: str, mode: str, seconds: float, mb: float) -> Result:
    return Result(Case(model, 64, mode), "ok", params=1_000_000, times_s=[seconds * 2, seconds, seconds * 0.9], peak_mb=mb)


def test_report_ratios_and_failure_notes() -> None:
    long_error = "RuntimeError: " + "x" * 80
    results = [_ok("segmamba", "infer", 1.0, 900), _ok("segmamba", "train", 2.0, 1500),
               _ok("swinunetr", "infer", 4.0, 1200), _ok("swinunetr", "train", 8.0, 3000),
               Result(Case("mednext", 64, "infer"), "timeout", "over 60 s"),
               Result(Case("mednext", 64, "train"), "error", long_error)]
    md = markdown_table(results, {"machine": "test"})
    rows = _table_rows(md)
    assert rows["segmamba"][3:] == ["1.000", "2.000", "900", "1,500"]  # medians of (2t, t, 0.9t) = t
    assert rows["mednext"][3] == "timeout: over 60 s" and rows["mednext"][4] == "error [1]"
    assert f"- [1] error: {long_error}" in md
    ratio_table = md[md.index("SegMamba relative"):]
    ratios = re.search(r"\| swinunetr \| 64³ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", ratio_table)
    assert ratios and ratios.groups() == ("0.25", "0.25", "0.50")


def test_stage_profile_covers_the_training_step() -> None:
    text = profile_model("segmamba", 32, "cpu", 1, tiny=True)
    total = float(re.search(r"train step at 32³, batch 1, cpu: ([\d.]+) s", text).group(1))
    stages_md = text[text.index("### Stages"):text.index("### Modules")]
    rows = {cells[0]: cells[1:] for cells in (line.strip("|").split("|") for line in stages_md.splitlines()
                                              if line.startswith("| ") and not line.startswith("| ---"))}
    rows = {k.strip(): v for k, v in rows.items()}
    for stage in ("stem (conv 7^3, stride 2)", "GSC blocks", "Mamba layers (LayerNorm + ToM)", "decoder (UNETR blocks + head)"):
        assert float(rows[stage][0]) > 0 and float(rows[stage][1]) > 0, (stage, text)
    covered = sum(float(v[0]) + float(v[1]) for k, v in rows.items() if v[0].strip() and k != "stage")
    # The stages hold nearly all of a step; the rest is the loss and the SGD step.
    assert 0.6 * total < covered <= 1.02 * total, text
    assert "3D convolution" in text, text
    share = re.search(r"\*\*Layout copies: ([\d.]+)% of the step's op time \(([\d.]+) s; goal < 2%", text)
    assert share and 0 <= float(share.group(1)) < 100, text
    by_stage = text[text.index("### Layout copies by stage"):]
    assert "Mamba layers (LayerNorm + ToM)" in by_stage, text
    if scan_backend("cpu") != "reference":  # the reference scan is plain PyTorch ops, not one custom op
        assert "selective scan (ToM)" in text, text


def test_gpu_kernels_script_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "k.md"
    proc = _run(["benchmarks/gpu_kernels.py", "--quick", "--device", "cpu", "--out", str(out), "--orders", "forward",
                 "reverse", "inter_slice", "--deterministic-too"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in out.read_text().splitlines() if line.startswith("| selective")
            or line.startswith("| causal")]
    backends = {r[4].strip() for r in rows}
    assert "reference" in backends
    for op, dtype, L, order, backend, kind, ms, gbs, pct, err in (map(str.strip, r) for r in rows):
        assert float(ms) > 0 and float(gbs) > 0, (op, order, backend, kind)
        if err != "-":  # forward of a fast backend against the float64 reference on the same inputs
            assert float(err) < (1e-5 if dtype == "fp32" else 2e-2), (op, dtype, L, order, backend, err)
    passes = {(r[0].strip(), r[3].strip(), r[5].strip()) for r in rows}
    assert passes >= {(op, order, kind) for op in ("selective_scan", "causal_conv1d")
                      for order in ("forward", "reverse", "inter_slice") for kind in ("fwd", "fwd+bwd", "fwd+bwd det")}


def test_gpu_check_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_dry_run_fits_its_window() -> None:
    """--dry-run prints the plan without a GPU: the default check ends by 6 minutes (a 15-minute
    lease runs it twice), its test part by 3 minutes after the build, and its test files exist."""
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deadlines = {m[0]: int(m[1]) for m in re.findall(r"^(\S+)\s+by\s+(\d+) s:", proc.stdout, re.M)}
    assert set(deadlines) >= {"build", "tests", "kernel-timings", "models-128"}, proc.stdout
    assert max(d for name, d in deadlines.items() if name != "models-128") <= 360
    assert deadlines["tests"] - deadlines["build"] <= 180
    files = re.search(r"^  tests = .* -m 'not emulated' (.*)$", proc.stdout, re.M).group(1).split()
    assert files and all((ROOT / f).is_file() for f in files), files


@pytest.mark.parametrize("argv", [["--models", "nope"], ["--crops", "0"], ["--device", "tpu"], ["--rounds", "0"],
                                  ["--profile", "--compile"], ["--busy", "--device", "cuda"]])
def test_bench_cli_rejects_bad_arguments(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


# --- the quality comparison (python -m segmamba.bench --quality) ---

def test_quality_quick_trains_predicts_and_scores_every_model(tmp_path: Path) -> None:
    """One seed of every model, one step each, on a tiny generated set: the table, the control line, the plot.

    In a process of its own, as users run it: the bench sets the OpenMP wait policy before torch
    loads, which this test process (torch imported by conftest) cannot."""
    proc = _run(["-m", "segmamba.bench", "--quality", "--quick", "--seeds", "0", "--out", str(tmp_path)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "cpu_quality_quick.md").read_text()
    rows = _table_rows(md)
    for model in QUALITY_MODELS:
        row = rows[model]
        assert row[2] == "1", row  # one seed finished
        dice = [float(c) for c in row[3:6]]
        hd95 = [float(c) for c in row[6:9]]
        assert all(0.0 <= d <= 1.0 for d in dice) and all(h >= 0.0 for h in hd95), row
        assert float(row[9]) > 0, row  # training time
    assert "Dice WT" in md and "HD95 ET" in md
    assert re.search(r"Mamba layers' effect: mean Dice of segmamba minus segmamba_nomamba, paired by seed: [+-]\d", md)
    image = matplotlib.image.imread(tmp_path / "cpu_quality_quick.png")
    assert image.shape[1] > 300 and image.std() > 0


def _qrun(model: str, seed: int, dice: float, status: str = "ok") -> QualityRun:
    scores = {"Dice_WT": dice, "Dice_TC": dice - 0.1, "Dice_ET": dice - 0.2, "HD95_WT": 5.0, "HD95_TC": 6.0,
              "HD95_ET": 7.0} if status == "ok" else {}
    return QualityRun(model, seed, status, "" if status == "ok" else "boom", params=1_500_000, train_s=10.0 + seed,
                      peak_mb=900.0, scores=scores, n_cases=6)


def test_quality_table_statistics_and_control_line() -> None:
    runs = [_qrun("segmamba", 0, 0.90), _qrun("segmamba_nomamba", 0, 0.86), _qrun("segmamba", 1, 0.80),
            _qrun("segmamba_nomamba", 1, 0.80), _qrun("unetr", 0, 0.70), _qrun("unetr", 1, 0.0, "error")]
    md = quality_markdown(runs, {"machine": "test"})
    rows = _table_rows(md)
    # Means and sample std over seeds: Dice WT of segmamba over (0.90, 0.80) = 0.850 +- 0.071.
    assert rows["segmamba"][1:4] == ["1.50", "2", "0.850 ± 0.071"], rows["segmamba"]
    assert rows["unetr"][2] == "1" and rows["unetr"][3] == "0.700", rows["unetr"]  # the failed seed is left out
    assert "unetr, seed 1: error: boom" in md
    # Mean Dice differences paired by seed: (0.90 - 0.86, 0.80 - 0.80) -> +0.020 +- 0.028.
    assert "paired by seed: +0.020 ± 0.028 (std over 2 seeds)" in md
    assert '- segmamba_nomamba: `{"feat_size": [8, 16, 32, 64], "hidden_size": 64}`' in md


def test_quality_rejects_models_without_a_small_configuration(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--quality", "--models", "swinunetr_v2"])
    assert e.value.code == 2 and "no quality configuration for ['swinunetr_v2']" in capsys.readouterr().err


def test_nomamba_control_is_segmamba_without_its_mamba_layers() -> None:
    cfg = QUALITY_CONFIGS
    full = build_model(**model_config("segmamba", roi_size=32, **cfg["segmamba"]))
    control = build_model(**model_config("segmamba_nomamba", roi_size=32, **cfg["segmamba_nomamba"]))
    full_keys = {k: v.shape for k, v in full.state_dict().items() if not k.startswith("encoder.stages.")}
    assert any(k.startswith("encoder.stages.") for k in full.state_dict())
    assert {k: v.shape for k, v in control.state_dict().items()} == full_keys
    assert all(len(stage) == 0 for stage in control.encoder.stages)
    with pytest.raises(ValueError, match=r"\['depths'\] are set from .* or fixed for segmamba_nomamba"):
        model_config("segmamba_nomamba", depths=[1, 1, 1, 1])


# --- the busy-machine benchmark (python -m segmamba.bench --busy) and the OpenMP wait policy ---

def _policy_in_fresh_interpreter(code: str, **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                            "SEGMAMBA_SET_OMP_WAIT_POLICY", "SEGMAMBA_CPU_TUNING")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**base, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def test_wait_policy_passive_unless_the_user_chose_or_torch_came_first() -> None:
    show = "import os, segmamba.cpu_threads as c; print(c.WAIT_POLICY_NOTE); print(os.environ.get('OMP_WAIT_POLICY'))"
    note, policy = _policy_in_fresh_interpreter(show, SEGMAMBA_CPU_TUNING="passive")
    assert policy == "PASSIVE" and note.startswith("OpenMP wait policy: passive"), note
    note, policy = _policy_in_fresh_interpreter(show, OMP_WAIT_POLICY="ACTIVE")
    assert policy == "ACTIVE" and "as set by the user (OMP_WAIT_POLICY=ACTIVE)" in note
    note, policy = _policy_in_fresh_interpreter(show, SEGMAMBA_CPU_TUNING="0")
    assert policy == "None" and "library default" in note
    note, policy = _policy_in_fresh_interpreter("import torch; " + show, SEGMAMBA_CPU_TUNING="passive")
    assert policy == "None" and "torch was imported before" in note
    # The trainer's module sets it before it imports torch.
    note, policy = _policy_in_fresh_interpreter(
        "import os, segmamba.train, segmamba.cpu_threads as c; print(c.WAIT_POLICY_NOTE); "
        "print(os.environ.get('OMP_WAIT_POLICY'))", SEGMAMBA_CPU_TUNING="passive")
    assert policy == "PASSIVE", note
    with pytest.raises(AssertionError, match="SEGMAMBA_CPU_TUNING: expected one of"):
        _policy_in_fresh_interpreter(show, SEGMAMBA_CPU_TUNING="yes")


def test_wait_policy_auto_is_passive_beside_a_busy_process() -> None:
    show = "import os, segmamba.cpu_threads as c; print(c.WAIT_POLICY_NOTE); print(os.environ.get('OMP_WAIT_POLICY'))"
    spinner = start_spinner(pin_cpu=None)
    try:
        time.sleep(0.3)
        note, policy = _policy_in_fresh_interpreter(show)
    finally:
        spinner.kill()
        spinner.wait()
    assert policy == "PASSIVE" and "another process running at start" in note, note


@pytest.mark.parametrize("counts, expected", [([1, 1, 1], 0), ([3, 1, 2], 0), ([2, 3, 2], 1), ([5, 4, 6], 3),
                                              ([], None)])
def test_other_runnable_tasks_takes_the_least_reading(monkeypatch, counts, expected) -> None:
    from segmamba import cpu_threads

    readings = iter(counts)

    def fake_open(path, *a, **k):
        if path != "stat":
            raise OSError(path)
        return io.StringIO("cpu  1 2 3\n" + (f"procs_running {next(readings)}\n" if counts else "") + "procs_blocked 0\n")

    monkeypatch.setattr("builtins.open", fake_open)
    got = cpu_threads.other_runnable_tasks(samples=max(1, len(counts)), interval_s=0.0, stat="stat")
    assert got == expected
    assert cpu_threads.other_runnable_tasks(samples=1, interval_s=0.0, stat="missing") is None


def test_library_default_env_drops_only_our_own_policy() -> None:
    ours = library_default_env({"OMP_WAIT_POLICY": "PASSIVE", "SEGMAMBA_SET_OMP_WAIT_POLICY": "1", "X": "1"})
    assert ours == {"X": "1", "SEGMAMBA_CPU_TUNING": "0"}
    assert own_choice_env({"OMP_WAIT_POLICY": "PASSIVE", "SEGMAMBA_SET_OMP_WAIT_POLICY": "1", "X": "1"}) == {"X": "1"}
    assert own_choice_env({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}
    users = library_default_env({"OMP_WAIT_POLICY": "ACTIVE"})
    assert users == {"OMP_WAIT_POLICY": "ACTIVE", "SEGMAMBA_CPU_TUNING": "0"}


def test_spinner_keeps_one_cpu_busy() -> None:
    proc = start_spinner(pin_cpu=0)
    try:
        time.sleep(1.0)
        with open(f"/proc/{proc.pid}/stat") as f:
            ticks = sum(int(v) for v in f.read().rsplit(")", 1)[1].split()[11:13])  # utime + stime
        assert os.sched_getaffinity(proc.pid) == {0}
    finally:
        proc.kill()
        proc.wait()
    assert ticks / os.sysconf("SC_CLK_TCK") > 0.1  # it computes (a fair share of a CPU, on a busy machine)


def test_busy_measure_interleaves_and_summarises(monkeypatch) -> None:
    calls = []

    def fake_trainer(config, args, out, timeout_s):
        busy = bool(_spinners())
        calls.append((config, busy))
        return (30.0 if busy else 10.0) * (2.0 if config == "library" else 1.0), ""

    monkeypatch.setattr(busy_bench, "run_trainer", fake_trainer)
    runs = busy_bench.measure(["library", "segmamba"], rounds=2, quick=True)
    # The untimed preparation run, then per round and configuration alone/busy, busy/alone in odd rounds.
    assert calls == [("segmamba", False),
                     ("library", False), ("library", True), ("segmamba", False), ("segmamba", True),
                     ("library", True), ("library", False), ("segmamba", True), ("segmamba", False)]
    assert not _spinners()
    summary = busy_bench.summary(runs)
    assert summary["library"] == {"alone": 20.0, "busy": 60.0, "slowdown": 3.0}
    assert summary["segmamba"]["slowdown"] == 3.0
    md = busy_bench.markdown(runs, {"machine": "test"})
    assert _table_rows(md)["library"] == ["library", "20.0", "60.0", "3.00x"]


def _spinners() -> list[int]:
    """Our own spinner processes that are still running."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if int(ppid) == os.getpid() and b"while True: pass" in cmd and state != "Z":
            found.append(int(pid))
    return found


def test_busy_warning_follows_the_load(monkeypatch) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    assert busy_warning() is None
    monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 1.0, 0.5))
    assert "load average 2.50 > 0.5" in busy_warning()
