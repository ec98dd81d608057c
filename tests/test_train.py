"""Trainer: CLI end to end, bit-for-bit resume, non-finite stop, validation metric, 2-process torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segmamba import train
from segmamba.checkpoint import load_checkpoint
from segmamba.data import synth
from segmamba.data.regions import REGIONS
from segmamba.training import config
from segmamba.training.distributed import Dist
from segmamba.training.loop import NonFiniteLossError, make_loss, poly_lambda, train_epoch
from segmamba.training.validate import validate

ROOT = Path(__file__).resolve().parents[1]
SPACING = "6"  # 33x39x32 volumes
# Smallest SegMamba that trains at a 32^3 crop (the deepest stage is then 2^3 voxels).
TINY_SEGMAMBA = ["--model", "segmamba", "--roi", "32", "--model-args",
                 json.dumps({"feat_size": [4, 8, 8, 16], "depths": [1, 1, 1, 1], "hidden_size": 16})]
# A fast convolutional model for the tests that run several short trainings (no dropout: the
# DDP comparison needs the same computation on every sample whichever rank draws it).
FAST = ["--model", "segresnet", "--roi", "32", "--model-args", json.dumps({"init_filters": 8, "dropout_prob": 0.0})]
COMMON = ["--no-progress", "--workers", "0", "--optimizer", "sgd", "--lr", "1e-2", "--momentum", "0.9",
          "--loss", "dicece", "--val-every", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats")
    synth.write_dataset(root, 7, seed=11, spacing=float(SPACING))  # split 5 / 1 / 1
    return root


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return env


def _losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


def test_cli_one_epoch_end_to_end_on_generated_set(tmp_path):
    """Generates the embedded set, trains SegMamba one epoch under bf16 autocast, validates, saves."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "segmamba.train", "--synth-dir", str(tmp_path / "synthetic"),
           "--synth-cases", "4", "--synth-spacing", SPACING, "--epochs", "1", "--iters-per-epoch", "2",
           "--batch-size", "1", "--amp", "--out", str(out), *TINY_SEGMAMBA, *COMMON]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = [l for l in proc.stdout.splitlines() if l.startswith("final validation Dice")]
    assert final and all(f"{r} " in final[0] for r in REGIONS)
    assert (tmp_path / "synthetic" / synth.case_name(3)).is_dir()
    for name in ("metrics.csv", "curves.png", "last.pt", "best.pt", "split.json", "args.json"):
        assert (out / name).is_file(), name
    loss = _losses(out)
    assert len(loss) == 1 and np.isfinite(loss[0])

    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["train_config"]["roi_size"] == [32, 32, 32]
    assert ckpt["train_config"]["modalities"] == ["t2w", "t2f", "t1n", "t1c"]
    assert ckpt["train_config"]["label_scheme"]["regions"]["ET"] == [3]
    from segmamba.models import build_model
    model = build_model(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])  # strict: the config rebuilds exactly this network
    with torch.no_grad():
        assert model(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 4, 32, 32, 32)


def test_resume_is_bit_for_bit(data_dir, tmp_path):
    args = ["--data", str(data_dir), "--epochs", "2", "--iters-per-epoch", "2", "--batch-size", "2",
            *FAST, *COMMON, "--val-every", "2"]
    assert train.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert train.main([*args, "--out", str(tmp_path / "b"), "--stop-after", "1"]) == 0
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    torch.manual_seed(1234)  # a disturbed global RNG must not matter: the checkpoint restores it
    # The continuation also uses a worker process: sampling and augmentation must not depend on it.
    resumed = [*args, "--out", str(tmp_path / "b"), "--resume"]
    resumed[resumed.index("--workers") + 1] = "1"
    assert train.main(resumed) == 0
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert a["best_metric"] == b["best_metric"]


def test_deterministic_flag_turns_on_the_kernels_and_pytorch_switches(data_dir, tmp_path, monkeypatch):
    from segmamba_kernels.dispatch import deterministic_mode

    monkeypatch.delenv("SEGMAMBA_DETERMINISTIC", raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not deterministic_mode()
    try:
        assert train.main(["--data", str(data_dir), "--epochs", "1", "--iters-per-epoch", "1", "--batch-size", "1",
                           "--deterministic", "--out", str(tmp_path / "run"), *FAST, *COMMON]) == 0
        assert torch.are_deterministic_algorithms_enabled() and deterministic_mode()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
        assert json.loads((tmp_path / "run" / "args.json").read_text())["deterministic"] is True
    finally:
        torch.use_deterministic_algorithms(False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    args = ["--data", str(data_dir), "--epochs", "2", "--iters-per-epoch", "1", "--batch-size", "1",
            "--out", str(tmp_path), *FAST, *COMMON]
    assert train.main([*args, "--stop-after", "1"]) == 0
    before = (tmp_path / "last.pt").read_bytes()
    real = make_loss("dicece")
    monkeypatch.setattr(train, "make_loss", lambda name: lambda logits, label: real(logits, label) * float("nan"))
    assert train.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "loss is nan at epoch 2, iteration 1" in err and "last good checkpoint" in err
    assert (tmp_path / "last.pt").read_bytes() == before


def test_train_epoch_raises_on_non_finite_loss():
    model = torch.nn.Conv3d(4, 4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(10))
    batch = {"image": torch.full((1, 4, 4, 4, 4), float("inf")), "label": torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)}
    w = model.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match="epoch 1, iteration 1"):
        train_epoch(model, [batch], make_loss("ce"), opt, sched, torch.device("cpu"), Dist(), amp=False, clip=12,
                    epoch=0)
    assert torch.equal(model.weight, w)  # no step was taken with the bad loss


def test_poly_lr_and_loss_choices():
    f = poly_lambda(100)
    assert f(0) == 1.0 and f(100) == 0.0 and f(50) == pytest.approx(0.5 ** 0.9)
    with pytest.raises(ValueError, match="--loss"):
        make_loss("focal")


def _volume(label: torch.Tensor) -> dict:
    # One-hot labels as a 4-channel image: an identity "model" then predicts the labels exactly.
    return {"image": torch.nn.functional.one_hot(label, 4).permute(3, 0, 1, 2).float() * 10, "label": label}


def test_validate_dice_and_empty_mask_convention():
    label = torch.zeros(20, 18, 16, dtype=torch.long)
    label[4:12, 4:12, 4:12] = 2
    label[6:10, 6:10, 6:10] = 1
    no_et = _volume(label.clone())
    label[8:10, 8:10, 8:10] = 3
    with_et = _volume(label)
    identity = torch.nn.Identity()
    dice = validate(identity, [no_et, with_et], (16, 16, 16), torch.device("cpu"), Dist(), amp=False)
    assert dice == {"WT": 1.0, "TC": 1.0, "ET": 1.0, "mean": 1.0}  # no ET on both sides counts as 1

    class DropET(torch.nn.Module):  # predicts enhancing tumour as background
        def forward(self, x):
            return torch.cat([x[:, :1] + x[:, 3:], x[:, 1:3], torch.zeros_like(x[:, 3:])], 1)

    dice = validate(DropET(), [with_et], (16, 16, 16), torch.device("cpu"), Dist(), amp=False)
    tc_ref, et = int(((label == 1) | (label == 3)).sum()), int((label == 3).sum())
    wt_ref = int((label > 0).sum())
    assert dice["ET"] == 0.0
    assert dice["TC"] == pytest.approx(2 * (tc_ref - et) / (2 * tc_ref - et))
    assert dice["WT"] == pytest.approx(2 * (wt_ref - et) / (2 * wt_ref - et))


def test_help_and_argument_errors(capsys):
    text = config.build_parser().format_help()
    for opt in ("--data", "--model", "--epochs", "--iters-per-epoch", "--val-every", "--out", "--device",
                "--amp", "--resume", "--seed", "--workers", "--loss", "--roi", "--batch-size", "--lr"):
        assert opt in text
    brats = config.parse(["--data", "x"])
    assert (brats.roi, brats.batch_size, brats.optimizer, brats.lr, brats.momentum, brats.weight_decay,
            brats.loss, brats.clip) == ([128] * 3, 2, "sgd", 1e-2, 0.99, 3e-5, "ce", 12.0)
    with pytest.raises(SystemExit):
        config.parse(["--roi", "0"])
    assert "--roi: expected 1 or 3 positive ints, got [0, 0, 0]" in capsys.readouterr().err


def test_torchrun_two_processes_match_single_process(data_dir, tmp_path):
    common = ["--data", str(data_dir), "--epochs", "1", "--iters-per-epoch", "3", "--val-every", "1",
              "--seed", "3", *FAST, *COMMON]
    single = [sys.executable, "-m", "segmamba.train", *common, "--batch-size", "2", "--out", str(tmp_path / "one")]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "segmamba.train", *common, "--batch-size", "1", "--out", str(tmp_path / "two")]
    for cmd in (single, ddp):
        proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5)
    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    for k in a["model"]:
        # Gradients are summed in another order (per rank, then all-reduce): equal up to float noise,
        # which dominates the tiny, nearly cancelling gradient of a norm bias feeding another norm.
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-3, atol=5e-4)
    assert b["best_metric"] == pytest.approx(a["best_metric"], abs=1e-3)


_FAULTS_PROBE = """
import resource, sys, torch
from segmamba.host_memory import keep_freed_memory
print(repr(keep_freed_memory()))
block_mib = int(sys.argv[1])
def faults_of_a_step():  # 96 MiB written in blocks, then freed together, like a step's gradients
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(block_mib << 18) for _ in range(96 // block_mib)]
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(max([faults_of_a_step() for _ in range(10)][-3:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
@pytest.mark.parametrize("block_mib", [1, 48], ids=lambda b: f"{b}MiB")
@pytest.mark.parametrize("opt_out", [False, True])
def test_keep_freed_memory(opt_out, block_mib):
    """With the setting, memory freed by one step is reused by the next without page faults,
    for blocks below glibc's mmap threshold (1 MiB) and above it (48 MiB, which glibc otherwise
    maps afresh and unmaps on every free). (Without it, whether glibc returns the 1 MiB blocks
    to the OS depends on the thresholds it adapted earlier in the process: about half of such
    runs here fault all 24,576 pages in every step.)"""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["SEGMAMBA_KEEP_FREED_MEMORY"] = "0" if opt_out else "1"
    res = subprocess.run([sys.executable, "-c", _FAULTS_PROBE, str(block_mib)], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    why, faults = res.stdout.split()
    if opt_out:
        assert why == "'SEGMAMBA_KEEP_FREED_MEMORY=0'"
    else:
        assert why == "None"
        assert int(faults) < (96 << 20) // 4096 // 20
