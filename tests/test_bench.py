"""The benchmark tools end to end on CPU: `python -m segmamba.bench --quick`, the report's tables,
the stage profiler and `benchmarks/gpu_kernels.py --quick --device cpu` (the GPU check script's
kernel timing, run here on tiny shapes so that it is tested code)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from segmamba.bench import QUICK_CROP, main
from segmamba.benchmarking.cases import Case, Result, scan_backend
from segmamba.benchmarking.report import markdown_table
from segmamba.benchmarking.stages import profile_model

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
    if scan_backend("cpu") != "reference":  # the reference scan is plain PyTorch ops, not one custom op
        assert "selective scan (ToM)" in text, text


def test_gpu_kernels_script_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "k.md"
    proc = _run(["benchmarks/gpu_kernels.py", "--quick", "--device", "cpu", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in out.read_text().splitlines() if line.startswith("| selective")
            or line.startswith("| causal")]
    backends = {r[3].strip() for r in rows}
    assert "reference" in backends
    for op, dtype, L, backend, kind, ms, gbs, pct, err in (map(str.strip, r) for r in rows):
        assert float(ms) > 0 and float(gbs) > 0, (op, backend, kind)
        if err != "-":  # forward of a fast backend against the float64 reference on the same inputs
            assert float(err) < (1e-5 if dtype == "fp32" else 2e-2), (op, dtype, L, backend, err)
    assert {(r[0].strip(), r[4].strip()) for r in rows} >= {("selective_scan", "fwd"), ("selective_scan", "fwd+bwd"),
                                                            ("causal_conv1d", "fwd"), ("causal_conv1d", "fwd+bwd")}


def test_gpu_check_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("argv", [["--models", "nope"], ["--crops", "0"], ["--device", "tpu"]])
def test_bench_cli_rejects_bad_arguments(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
