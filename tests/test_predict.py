"""segmamba.predict: sliding-window probabilities, mirror TTA, crop undo, NIfTI geometry, CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segmamba.checkpoint import CheckpointError, save_checkpoint
from segmamba.data.brats import MODALITIES, load_case
from segmamba.data.preprocess import normalize_nonzero
from segmamba.models.channels_last import to_channels_last
from segmamba.predict import MIRRORS, load_model, main, predict_case, predict_probabilities

ROI = 32
TINY = dict(feat_size=[8, 16, 32, 64], hidden_size=32)


def oblique_affine() -> np.ndarray:
    """Rotated, anisotropic, shifted voxel-to-world matrix: catches any geometry that is dropped."""
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.9, 1.3, 2.5])
    affine[:3, 3] = [12.5, -40.0, 7.25]
    return affine


def write_case(root: Path, name: str, shape=(23, 29, 19), seed: int = 0, modalities=MODALITIES,
               with_seg: bool = True) -> Path:
    """Case folder with a brain box smaller than the volume (so preprocessing crops) and a lesion."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    brain = (slice(3, shape[0] - 2), slice(2, shape[1] - 4), slice(1, shape[2] - 3))
    label = np.zeros(shape, np.uint8)
    c = [(s.start + s.stop) // 2 for s in brain]
    label[c[0] - 4:c[0] + 4, c[1] - 5:c[1] + 3, c[2] - 3:c[2] + 3] = 2
    label[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] = 3
    label[c[0] - 1:c[0] + 1, c[1] - 1:c[1] + 1, c[2] - 1:c[2] + 1] = 1
    for m in modalities:
        data = np.zeros(shape, np.float32)
        data[brain] = rng.uniform(100.0, 900.0, size=data[brain].shape)
        data[label > 0] += 500.0
        nib.save(with_header(nib.Nifti1Image(data, oblique_affine())), str(folder / f"{name}-{m}.nii.gz"))
    if with_seg:
        nib.save(with_header(nib.Nifti1Image(label, oblique_affine())), str(folder / f"{name}-seg.nii.gz"))
    return folder


def with_header(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Header fields a fresh Nifti1Image would not have, so a dropped header is noticed."""
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=4)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"segmamba test case"
    return img


def pointwise_net(seed: int = 0) -> torch.nn.Module:
    """1x1x1 conv: its output at a voxel depends on that voxel only, so it is mirror-symmetric."""
    torch.manual_seed(seed)
    return torch.nn.Conv3d(4, 4, 1).eval()


def conv_net(seed: int = 0, symmetric: bool = False) -> torch.nn.Module:
    """Two 3x3x3 convs; with `symmetric` every kernel equals its mirror image on all three axes,
    so net(flip(x)) == flip(net(x)) for every flip."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 6, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv3d(6, 4, 3, padding=1)).eval()
    if symmetric:
        with torch.no_grad():
            for conv in (net[0], net[2]):
                w = conv.weight
                w.copy_(sum(w.flip(axes) for axes in MIRRORS) / len(MIRRORS))
    return net


# ---------------------------------------------------------------- probabilities and mirror TTA

def test_mirrors_are_identity_plus_all_seven_axis_combinations():
    assert MIRRORS[0] == ()
    assert sorted(MIRRORS[1:]) == sorted([(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)])


@pytest.mark.parametrize("shape", [(17, 9, 29), (1, 16, 5)])
def test_tta_of_pointwise_model_changes_nothing(shape):
    x = torch.randn(4, *shape)
    net = pointwise_net()
    plain = predict_probabilities(net, x, (16, 16, 16))
    tta = predict_probabilities(net, x, (16, 16, 16), tta=True)
    torch.testing.assert_close(tta, plain, atol=1e-6, rtol=1e-5)
    # and both are the plain softmax of the net: the sliding window adds nothing for a 1x1x1 model
    torch.testing.assert_close(plain, torch.softmax(net(x[None]), 1)[0], atol=1e-5, rtol=1e-5)


def test_tta_of_mirror_symmetric_conv_net_changes_nothing():
    # At most two windows per axis (21 -> starts 0 and 5 with roi 16), so the window grid is
    # mirror-symmetric too (with three or more it need not be, and TTA then shifts the blend slightly).
    x = torch.randn(4, 21, 16, 19)
    net = conv_net(symmetric=True)
    plain = predict_probabilities(net, x, (16, 16, 16))
    tta = predict_probabilities(net, x, (16, 16, 16), tta=True)
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=1e-4)


def test_tta_averages_mirrored_softmax_of_asymmetric_net():
    x = torch.randn(4, 16, 16, 16, dtype=torch.float32)
    net = conv_net(seed=1)
    tta = predict_probabilities(net, x, (16, 16, 16), tta=True)
    with torch.no_grad():
        expected = sum(torch.softmax(net(x[None].flip(a)), 1).flip(a) if a else torch.softmax(net(x[None]), 1)
                       for a in MIRRORS)[0] / 8
        plain = torch.softmax(net(x[None]), 1)[0]
    torch.testing.assert_close(tta, expected, atol=1e-5, rtol=1e-4)
    assert (tta - plain).abs().max() > 1e-3  # the net is not symmetric: TTA must have done something


def test_probabilities_bad_input():
    with pytest.raises(ValueError, match="image: expected shape"):
        predict_probabilities(pointwise_net(), torch.zeros(4, 8, 8), (8, 8, 8))
    with pytest.raises(ValueError, match="roi_size"):
        predict_probabilities(pointwise_net(), torch.zeros(4, 8, 8, 8), (8, 8))


# ---------------------------------------------------------------- whole case: crop, paste back

def test_predict_case_undoes_crop_and_matches_thresholded_normalised_input(tmp_path):
    case = load_case(write_case(tmp_path, "C-1"), with_label=False)
    # logits (0, 10 * z-score of channel 1, -1, -1): label 1 where that channel is above its brain mean
    net = torch.nn.Conv3d(4, 4, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(torch.tensor([0.0, 0.0, -1.0, -1.0]))
        net.weight[1, 1] = 10.0
    labels = predict_case(net.eval(), case, (16, 16, 16))
    assert labels.shape == case.image.shape[1:] and labels.dtype == np.uint8
    brain = (slice(3, 21), slice(2, 25), slice(1, 16))  # write_case's brain box
    expected = np.zeros_like(labels)
    expected[brain] = normalize_nonzero(case.image[(slice(None),) + brain])[1] > 0
    np.testing.assert_array_equal(labels, expected)
    assert expected.sum() > 100 and (expected[brain] == 0).sum() > 100


def test_predict_case_rejects_model_without_four_outputs(tmp_path):
    case = load_case(write_case(tmp_path, "C-1"), with_label=False)
    with pytest.raises(ValueError, match="expected 4 output channels"):
        predict_case(torch.nn.Conv3d(4, 3, 1).eval(), case, (16, 16, 16))


# ---------------------------------------------------------------- checkpoints and the command line

def tiny_checkpoint(path: Path, *, name: str = "segmamba", modalities=MODALITIES, seed: int = 0,
                    weights_of: dict | None = None, **overrides) -> Path:
    from segmamba.models import build_model, model_config
    cfg = model_config(name, in_chans=overrides.pop("in_chans", len(modalities)), out_chans=4,
                       roi_size=(ROI,) * 3, **{**(TINY if name == "segmamba" else {}), **overrides})
    torch.manual_seed(seed)
    weights = build_model(**(weights_of or cfg)).state_dict()
    return save_checkpoint(path, {"model_config": cfg, "model": weights,
                                  "train_config": {"roi_size": [ROI] * 3, "modalities": list(modalities)}})


def assert_same_geometry(out: Path, case_dir: Path) -> None:
    src = nib.load(str(case_dir / f"{case_dir.name}-t2w.nii.gz"))
    img = nib.load(str(out))
    assert img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    np.testing.assert_allclose(img.header.get_zooms(), src.header.get_zooms())
    for key in ("qform_code", "sform_code", "xyzt_units", "descrip", "quatern_b", "quatern_c", "quatern_d"):
        assert img.header[key] == src.header[key], key
    assert img.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(img.dataobj)).tolist()) <= {0, 1, 2, 3}


def test_cli_predicts_folder_keeps_geometry_and_reports_bad_case(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    data = tmp_path / "data"
    good = [write_case(data, "G-1", shape=(23, 29, 19), seed=1), write_case(data, "G-2", shape=(37, 20, 25), seed=2)]
    write_case(data, "M-3", modalities=("t2w", "t1n", "t1c"))  # no t2f: the checkpoint needs 4 modalities
    bad_nifti = write_case(data, "U-4")
    (bad_nifti / "U-4-t1c.nii.gz").write_bytes(b"\x1f\x8b truncated")
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(ckpt), "--input", str(data), "--out", str(out), "--png", "--no-progress"])
    assert rc == 1
    for case_dir in good:
        assert_same_geometry(out / f"{case_dir.name}.nii.gz", case_dir)
        assert (out / f"{case_dir.name}.png").stat().st_size > 1000
    err = capsys.readouterr().err
    assert "M-3: case M-3: missing t2f file" in err
    assert "U-4-t1c.nii.gz" in err and "cannot read" in err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["G-1.nii.gz", "G-2.nii.gz"]


def test_cli_single_case_matches_library(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "model.pt", seed=3)
    case_dir = write_case(tmp_path / "data", "S-1", shape=(21, 26, 18))
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--input", str(case_dir), "--out", str(out), "--no-progress"]) == 0
    assert_same_geometry(out / "S-1.nii.gz", case_dir)
    model, tcfg = load_model(ckpt)
    to_channels_last(model)  # the CLI's default on a CPU; its convolutions round differently from NCDHW ones
    expected = predict_case(model, load_case(case_dir, with_label=False), tcfg["roi_size"])
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "S-1.nii.gz")).dataobj), expected)


def test_cli_split_selects_held_out_cases_and_names_missing_ones(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    data = tmp_path / "data"
    for i in range(3):
        write_case(data, f"S-{i}", seed=i)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["S-0"], "val": ["S-1"], "test": ["S-2"]}))
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--input", str(data), "--out", str(out), "--split", str(split),
                 "--no-progress"]) == 0
    assert [p.name for p in out.glob("*.nii.gz")] == ["S-2.nii.gz"]
    split.write_text(json.dumps({"train": ["S-0"], "val": ["S-1"], "test": ["S-2", "S-9"]}))
    assert main(["--checkpoint", str(ckpt), "--input", str(data), "--out", str(out), "--split", str(split),
                 "--no-progress"]) == 2
    assert "--split: 1 test case(s) not found under --input: S-9" in capsys.readouterr().err


def test_cli_passes_inference_options(tmp_path, monkeypatch):
    # TTA itself is tested above on the library function; here only its wiring (a real TTA run of
    # even a tiny SegMamba costs 8 forward passes per window on CPU).
    seen = {}

    def fake_predict_case(model, case, roi_size, **kw):
        seen.update(kw, roi_size=list(roi_size), training=model.training)
        return np.zeros(case.image.shape[1:], np.uint8)

    monkeypatch.setattr("segmamba.predict.predict_case", fake_predict_case)
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    case_dir = write_case(tmp_path / "data", "S-1")
    assert main(["--checkpoint", str(ckpt), "--input", str(case_dir), "--out", str(tmp_path / "o"), "--tta",
                 "--amp", "--sw-batch-size", "3", "--device", "cpu", "--no-progress"]) == 0
    assert seen.pop("description").channel_names() == list(MODALITIES)  # BraTS: the checkpoint has no dataset
    assert seen == {"tta": True, "amp": True, "sw_batch_size": 3, "roi_size": [ROI] * 3, "training": False}


class _Payload:
    """Unpickling this calls open(marker, "w"): code execution from a checkpoint file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model_config": {"name": "segmamba"}, "model": _Payload(marker),
                "train_config": {}}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_model(path)
    assert not marker.exists()
    # the payload is live: an unsafe load would have created the marker
    live = tmp_path / "live.pt"
    torch.save(_Payload(tmp_path / "live-marker"), live)
    torch.load(live, weights_only=False)
    assert (tmp_path / "live-marker").exists()


def test_checkpoint_errors_name_the_file(tmp_path, capsys):
    data = tmp_path / "data"
    write_case(data, "G-1")

    def run(ckpt: Path) -> str:
        assert main(["--checkpoint", str(ckpt), "--input", str(data), "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 2
        return capsys.readouterr().err

    assert "file not found" in run(tmp_path / "missing.pt") and "missing.pt" in run(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    assert "junk.pt" in run(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    assert "foreign.pt is not a segmamba checkpoint" in run(tmp_path / "foreign.pt")
    other = tiny_checkpoint(tmp_path / "other.pt")
    state = torch.load(other, weights_only=True)
    state["model_config"]["name"] = "resnet50"
    torch.save(state, tmp_path / "other.pt")
    assert "model 'resnet50' is not a segmamba model" in run(tmp_path / "other.pt")
    wider = dict(TINY, feat_size=[8, 16, 32, 48])
    from segmamba.models import model_config
    tiny_checkpoint(tmp_path / "mismatch.pt",
                    weights_of=model_config("segmamba", in_chans=4, out_chans=4, roi_size=(ROI,) * 3, **wider))
    err = run(tmp_path / "mismatch.pt")
    assert "mismatch.pt: weights do not fit model 'segmamba'" in err
    tiny_checkpoint(tmp_path / "chans.pt", modalities=("t2w", "t2f", "t1n"), in_chans=4)
    assert "chans.pt: model takes in_chans=4 channels but train_config lists 3 modalities" in run(tmp_path / "chans.pt")
