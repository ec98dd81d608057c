"""Any data set, not only BraTS: nnU-Net v2 and Decathlon layouts, descriptions, region-based labels,
planning (target spacing, CT statistics), resampling to the network grid and back, bad cases, and
the whole train -> predict -> evaluate path on a tiny anisotropic nnU-Net data set."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segmamba import evaluate, predict, train
from segmamba.checkpoint import load_checkpoint
from segmamba.data.cache import build_cache, settings_key
from segmamba.data.description import (Channel, DatasetDescription, IntensityStats, brats_description,
                                       msd_description, nnunet_description)
from segmamba.data.layouts import image_folder_cases, open_dataset
from segmamba.data.loading import CaseError, load_case
from segmamba.data.plan import foreground_samples, intensity_stats, plan_dataset, target_spacing
from segmamba.data.preprocess import normalize, preprocess_case, resample, restore, separate_axis
from segmamba.data.regions import outputs_to_labels, regions_to_labels, target_masks
from segmamba.training.loop import RegionLoss, make_loss

SPACING = (1.5, 1.0, 3.0)
EXTENT_MM = (36.0, 32.0, 36.0)
TWO_LABELS = {"background": 0, "lesion": 1, "organ": 2}
# A convolutional model that trains in a second (segresnet sides: multiples of 8).
FAST = ["--model", "segresnet", "--roi", "16", "--model-args", json.dumps({"init_filters": 8, "dropout_prob": 0.0})]
QUIET = ["--no-progress", "--workers", "0", "--val-every", "1"]


def oblique(spacing) -> np.ndarray:
    """Rotated voxel-to-world matrix with these voxel sizes: a dropped or rebuilt geometry shows."""
    a = np.deg2rad(25.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [-20.0, 14.5, 3.25]
    return affine


def phantom(spacing, seed: int, n_channels: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(C, X, Y, Z) image and labels {0, 1, 2}: a zero border (so cropping happens), a body of noise,
    an ellipsoid 'organ' (2) bright in channel 1 and a ball 'lesion' (1) inside it bright in channel 0."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(round(e / s)) for e, s in zip(EXTENT_MM, spacing))
    mm = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij"))
    centre = np.array([18.0, 16.0, 18.0]) + rng.uniform(-2, 2, 3)
    r = np.sqrt((((mm - centre[:, None, None, None]) / np.array([11.0, 9.0, 12.0])[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[r < 1.0] = 2
    lesion = np.sqrt(((mm - (centre + rng.uniform(-2, 2, 3))[:, None, None, None]) ** 2).sum(0)) < 5.0
    label[lesion & (r < 1.0)] = 1
    body = np.zeros(shape, bool)
    body[1:-1, 1:-1, 1:-1] = True
    image = np.zeros((n_channels,) + shape, np.float32)
    for c in range(n_channels):
        image[c] = np.where(body, rng.normal(100.0, 10.0, shape), 0.0)
    image[0][label == 1] += 150.0
    image[1 % n_channels][label == 2] += 80.0
    return image * np.where(body, 1.0, 0.0).astype(np.float32), label


def write_nnunet(root: Path, spacings: dict[str, tuple], labels: dict | None = None, channels=("T2", "ADC"),
                 regions_class_order=None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, (name, spacing) in enumerate(spacings.items()):
        image, label = phantom(spacing, i, len(channels))
        for c in range(len(channels)):
            nib.save(nib.Nifti1Image(image[c], oblique(spacing)), str(root / "imagesTr" / f"{name}_{c:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(label, oblique(spacing)), str(root / "labelsTr" / f"{name}.nii.gz"))
    meta = {"channel_names": {str(i): n for i, n in enumerate(channels)}, "labels": labels or TWO_LABELS,
            "numTraining": len(spacings), "file_ending": ".nii.gz", "name": "Tiny"}
    if regions_class_order is not None:
        meta["regions_class_order"] = regions_class_order
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# ---------------------------------------------------------------- descriptions

def test_nnunet_description_label_based_and_round_trip():
    desc = nnunet_description({"channel_names": {"1": "ADC", "0": "CT"}, "labels": TWO_LABELS,
                               "numTraining": 3, "file_ending": ".nii.gz"})
    assert [(c.name, c.key, c.norm) for c in desc.channels] == [("CT", "0000", "ct"), ("ADC", "0001", "zscore")]
    assert desc.label_values == (0, 1, 2) and desc.out_channels == 3 and not desc.region_based
    assert [(t.name, t.labels) for t in desc.evaluation] == [("lesion", (1,)), ("organ", (2,))]
    planned = desc.planned((1.5, 1.0, 3.0), [IntensityStats(1.0, 2.0, -5.0, 9.0), None])
    assert DatasetDescription.from_dict(json.loads(json.dumps(planned.to_dict()))) == planned
    assert settings_key(planned) != settings_key(desc) != settings_key(brats_description())
    # naming does not change the arrays, so it does not change the cache key
    renamed = nnunet_description({"channel_names": {"1": "ADC", "0": "CT"}, "numTraining": 3,
                                  "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"})
    assert settings_key(renamed) == settings_key(desc)


def test_region_based_description_loss_and_label_conversion():
    desc = nnunet_description({"channel_names": {"0": "FLAIR"}, "numTraining": 1, "file_ending": ".nii.gz",
                               "labels": {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3],
                                          "enhancing": 3},
                               "regions_class_order": [1, 2, 3]})
    assert desc.region_based and desc.out_channels == 3 and desc.label_values == (0, 1, 2, 3)
    assert [(r.name, r.labels) for r in desc.regions] == [("whole tumour", (1, 2, 3)), ("tumour core", (2, 3)),
                                                          ("enhancing", (3,))]
    assert desc.evaluation == desc.regions
    # Loss: one sigmoid per region against its mask (BCE + soft Dice), never a softmax over regions.
    label = torch.tensor([0, 1, 2, 3, 3, 1]).view(1, 1, 6, 1, 1)
    loss = make_loss("ce", desc.regions)
    assert isinstance(loss, RegionLoss)
    expected_targets = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.float32)
    torch.testing.assert_close(loss.targets(label)[0, :, :, 0, 0], expected_targets)
    logits = torch.randn(1, 3, 6, 1, 1, dtype=torch.float32)
    p = torch.sigmoid(logits[0, :, :, 0, 0].double())
    bce = -(expected_targets * p.log() + (1 - expected_targets) * (1 - p).log()).mean()
    assert float(loss(logits, label)) == pytest.approx(float(bce), rel=1e-5)
    dice_loss = make_loss("dicece", desc.regions)(logits, label) - loss(logits, label)
    soft = [1 - (2 * (p[j] * expected_targets[j]).sum() + 1e-5) / (p[j].sum() + expected_targets[j].sum() + 1e-5)
            for j in range(3)]
    assert float(dice_loss) == pytest.approx(float(sum(soft) / 3), rel=1e-4)
    # Regions -> labels: background, then each region's class in order, later ones win.
    probs = torch.tensor([[0.9, 0.9, 0.9, 0.2, 0.9], [0.1, 0.8, 0.8, 0.9, 0.1], [0.1, 0.1, 0.7, 0.9, 0.6]])
    assert outputs_to_labels(probs, desc, logits=False).tolist() == [1, 2, 3, 3, 3]
    assert outputs_to_labels(torch.logit(probs), desc, logits=True).tolist() == [1, 2, 3, 3, 3]
    assert regions_to_labels(probs > 0.5, (3, 1, 2)).tolist() == [3, 1, 2, 2, 2]
    # ...and back to regions for scoring
    masks = target_masks(np.array([0, 1, 2, 3]), desc.evaluation)
    assert masks.tolist() == [[False, True, True, True], [False, False, True, True], [False, False, False, True]]


@pytest.mark.parametrize("meta, message", [
    ({"labels": {"background": 0, "a": 2}}, "consecutive values"),
    ({"labels": {"background": 0, "a": [1, 2]}}, "regions_class_order is missing"),
    ({"labels": {"background": 0, "a": 1}, "regions_class_order": [1]}, "no label is a region"),
    ({"labels": {"background": 0, "a": 1, "ignore": 2}}, "'ignore' label"),
    ({"labels": {"a": 1}}, "background entry with value 0"),
    ({"labels": {"background": 0, "a": "x"}}, "expected an integer label value"),
    ({"file_ending": ".png"}, "file_ending"),
    ({"channel_names": {"0": "T1", "2": "T2"}}, "numbered 0..1"),
])
def test_nnunet_description_errors(meta, message):
    base = {"channel_names": {"0": "T1"}, "labels": TWO_LABELS, "numTraining": 1, "file_ending": ".nii.gz"}
    with pytest.raises(ValueError, match=message):
        nnunet_description({**base, **meta})


def test_msd_description():
    desc = msd_description({"modality": {"0": "FLAIR", "1": "T1w"}, "training": [],
                            "labels": {"0": "background", "2": "enhancing", "1": "edema"}})
    assert desc.layout == "msd" and desc.channel_names() == ["FLAIR", "T1w"]
    assert [(t.name, t.labels) for t in desc.evaluation] == [("edema", (1,)), ("enhancing", (2,))]
    assert msd_description({"modality": {"0": "CT"}, "training": [], "labels": {"0": "bg", "1": "liver"}}
                           ).channels[0].norm == "ct"


# ---------------------------------------------------------------- layouts and bad cases

def write_msd(root: Path, n: int = 3) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    training = []
    for i in range(n):
        image, label = phantom(SPACING, i)
        nib.save(nib.Nifti1Image(np.moveaxis(image, 0, 3), oblique(SPACING)), str(root / "imagesTr" / f"hip_{i:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(label, oblique(SPACING)), str(root / "labelsTr" / f"hip_{i:03d}.nii.gz"))
        training.append({"image": f"./imagesTr/hip_{i:03d}.nii.gz", "label": f"./labelsTr/hip_{i:03d}.nii.gz"})
    nib.save(nib.Nifti1Image(np.moveaxis(phantom(SPACING, 9)[0], 0, 3), oblique(SPACING)), str(root / "imagesTs" / "hip_100.nii.gz"))
    (root / "imagesTr" / "._hip_000.nii.gz").write_bytes(b"macOS resource fork")  # ignored
    (root / "dataset.json").write_text(json.dumps({
        "name": "Hippo", "modality": {"0": "MRI", "1": "MRI2"}, "labels": {"0": "background", "1": "lesion", "2": "organ"},
        "numTraining": n, "training": training, "test": ["./imagesTs/hip_100.nii.gz"]}))
    return root


def test_msd_detection_and_4d_loading(tmp_path):
    src = open_dataset(write_msd(tmp_path / "Task99_Hip"))
    assert src.description.layout == "msd" and [c.name for c in src.cases] == ["hip_000", "hip_001", "hip_002"]
    assert [c.name for c in src.unlabelled] == ["hip_100"]
    case = load_case(src.cases[1], src.description)
    image, label = phantom(SPACING, 1)
    np.testing.assert_array_equal(case.image, image)  # (C, X, Y, Z) from the channels-last 4D file
    np.testing.assert_array_equal(case.label, label)
    assert case.spacing == pytest.approx(SPACING)
    assert [c.name for c in image_folder_cases(tmp_path / "Task99_Hip" / "imagesTs", src.description)] == ["hip_100"]
    # a 4D file with the wrong channel count is a bad case, named
    bad = tmp_path / "Task99_Hip" / "imagesTr" / "hip_002.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(phantom(SPACING, 2, n_channels=3)[0], 0, 3), oblique(SPACING)), str(bad))
    with pytest.raises(CaseError, match=r"case hip_002: hip_002.nii.gz has shape .*expected \(X, Y, Z, 2\)"):
        load_case(src.cases[2], src.description)


def test_nnunet_bad_cases_are_named(tmp_path):
    root = write_nnunet(tmp_path / "D", {f"c{i}": SPACING for i in range(6)})
    src = open_dataset(root)
    desc = src.description
    (root / "imagesTr" / "c0_0001.nii.gz").unlink()
    lab = nib.load(str(root / "labelsTr" / "c1.nii.gz"))
    data = np.asarray(lab.dataobj).copy()
    data[2, 2, 2] = 3
    nib.save(nib.Nifti1Image(data, lab.affine), str(root / "labelsTr" / "c1.nii.gz"))
    img = nib.load(str(root / "imagesTr" / "c2_0001.nii.gz"))
    nib.save(nib.Nifti1Image(img.get_fdata()[:-1], img.affine), str(root / "imagesTr" / "c2_0001.nii.gz"))
    img = nib.load(str(root / "imagesTr" / "c3_0001.nii.gz"))
    shifted = img.affine.copy()
    shifted[0, 3] += 4.0
    nib.save(nib.Nifti1Image(img.get_fdata(), shifted), str(root / "imagesTr" / "c3_0001.nii.gz"))
    raw = (root / "imagesTr" / "c4_0000.nii.gz").read_bytes()
    (root / "imagesTr" / "c4_0000.nii.gz").write_bytes(raw[: len(raw) // 2])
    (root / "labelsTr" / "c5.nii.gz").unlink()
    expected = {"c0": "missing channel 0001 (ADC) file", "c1": "c1.nii.gz has labels [3] outside {0, 1, 2}",
                "c2": "c2_0001.nii.gz has shape", "c3": "c3_0001.nii.gz has a different affine",
                "c4": "cannot read c4_0000.nii.gz", "c5": "missing label file"}
    for case in src.cases:
        with pytest.raises(CaseError, match=rf"case {case.name}: .*{re.escape(expected[case.name])}"):
            load_case(case, desc)
    good, bad = build_cache(src.cases, tmp_path / "cache", desc)
    assert good == [] and sorted(bad) == [f"c{i}" for i in range(6)]


# ---------------------------------------------------------------- planning and normalisation

def test_target_spacing_follows_nnunet_rule():
    assert target_spacing([(1, 1, 1), (1.5, 1, 3), (2, 1, 3)], [(50, 50, 50)] * 3) == (1.5, 1.0, 3.0)
    # Anisotropic spacing and voxels: the coarse axis takes its 10th percentile...
    spacings = [(0.8, 0.8, 5.0), (0.8, 0.8, 6.0), (0.8, 0.8, 4.0), (0.8, 0.8, 8.0), (0.8, 0.8, 5.5)]
    shapes = [(300, 300, 20)] * 5
    expected_z = float(np.percentile([5.0, 6.0, 4.0, 8.0, 5.5], 10))
    assert target_spacing(spacings, shapes) == pytest.approx((0.8, 0.8, expected_z))
    # ...but only when the coarse axis also has few voxels,
    assert target_spacing(spacings, [(300, 300, 150)] * 5) == pytest.approx((0.8, 0.8, 5.5))
    # ...and never finer than the coarsest other axis (+1e-5).
    z = [0.5, 0.5] + [10.0] * 8  # median 10, 10th percentile 0.5
    assert target_spacing([(1.0, 0.5, v) for v in z], [(300, 300, 20)] * 10) == pytest.approx((1.0, 0.5, 1.0 + 1e-5))


def test_ct_normalisation_uses_training_foreground_statistics(tmp_path):
    root = write_nnunet(tmp_path / "CT", {f"c{i}": SPACING for i in range(3)}, channels=("CT", "T1"))
    src = open_dataset(root)
    assert [c.norm for c in src.description.channels] == ["ct", "zscore"]
    planned, bad = plan_dataset(src.description, src.cases[:2], "native", tmp_path / "cache")
    assert not bad and planned.spacing is None
    # the statistics are those of the foreground samples of the two training cases (not the third)
    pooled = np.concatenate([foreground_samples(load_case(c, src.description).image,
                                                load_case(c, src.description).label, [0]) for c in src.cases[:2]], 1)
    assert pooled.shape == (1, 20_000)
    fg = np.concatenate([load_case(c, src.description).image[0][load_case(c, src.description).label > 0]
                         for c in src.cases[:2]])
    assert np.isin(pooled, fg).all()  # drawn from foreground voxels only
    stats = planned.intensity[0]
    assert planned.intensity[1] is None
    assert stats == intensity_stats(pooled[0])
    assert stats.mean == pytest.approx(float(pooled.mean()), rel=1e-6)
    assert (stats.low, stats.high) == pytest.approx(tuple(np.percentile(pooled.astype(np.float64), (0.5, 99.5))))
    # cached: a second plan decodes nothing
    again, _ = plan_dataset(src.description, src.cases[:2], "native", tmp_path / "cache")
    assert again.intensity == planned.intensity
    image = np.stack([np.array([[[-1e4, stats.low, stats.mean, stats.high, 1e4]]], np.float32),
                      np.array([[[0.0, 1.0, 2.0, 3.0, 4.0]]], np.float32)])
    out = normalize(image, planned.channels, planned.intensity)
    expected = (np.clip(image[0], stats.low, stats.high) - stats.mean) / stats.std
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)
    nz = image[1] != 0
    np.testing.assert_allclose(out[1][nz], (image[1][nz] - image[1][nz].mean()) / image[1][nz].std(), rtol=1e-5)
    with pytest.raises(ValueError, match="intensity statistics"):
        normalize(image, planned.channels, ())


# ---------------------------------------------------------------- resampling to the network grid and back

def test_resampling_to_target_and_back_to_the_input_grid():
    desc = nnunet_description({"channel_names": {"0": "T2", "1": "ADC"}, "labels": TWO_LABELS, "numTraining": 1,
                               "file_ending": ".nii.gz"}).planned((1.5, 1.0, 3.0), [])
    image, label = phantom((1.2, 1.0, 3.0), 0)
    net, net_label, geom = preprocess_case(image, (1.2, 1.0, 3.0), desc, label)
    cropped = tuple(s.stop - s.start for s in geom.bbox)
    assert cropped == tuple(n - 2 for n in label.shape)  # the zero border is cropped
    assert geom.net_shape == (round(cropped[0] * 1.2 / 1.5), cropped[1], cropped[2]) == net.shape[1:] == net_label.shape
    assert geom.axis is None  # 3 / 1.0 is not more than 3: no separate axis
    assert set(np.unique(net_label)) == {0, 1, 2}
    # one-hot of the network-grid labels, restored, gives back the labels on the input's grid
    onehot = torch.nn.functional.one_hot(torch.from_numpy(net_label).long(), 3).permute(3, 0, 1, 2).float()
    back = restore(onehot, geom)
    assert tuple(back.shape) == (3,) + cropped
    agree = (back.argmax(0).numpy() == label[geom.bbox]).mean()
    assert agree > 0.95
    with pytest.raises(ValueError, match="spatial shape"):
        restore(onehot[:, :-1], geom)


def test_anisotropic_axis_is_resampled_by_nearest_neighbour_only():
    assert separate_axis((1.0, 1.0, 4.0), (1.0, 1.0, 1.0)) == 2
    assert separate_axis((1.0, 1.0, 1.0), (0.5, 2.0, 0.5)) == 1    # the target's coarse axis
    assert separate_axis((1.0, 1.0, 3.0), (1.0, 1.0, 3.0)) is None  # 3x is not more than 3x
    assert separate_axis((4.0, 1.0, 4.0), (4.0, 1.0, 4.0)) is None  # two coarse axes
    z = torch.arange(5, dtype=torch.float32).view(1, 1, 1, 5).expand(1, 4, 4, 5)
    up = resample(z, (8, 8, 10), axis=2)
    # slices are repeated, never blended: only the original slice values appear along z
    assert set(up.unique().tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}
    assert up[0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    blended = resample(z, (8, 8, 10))
    assert len(blended.unique()) > 5  # without the separate axis, trilinear interpolates along z


# ---------------------------------------------------------------- the whole path on a tiny nnU-Net set

def test_tiny_nnunet_dataset_train_predict_evaluate(tmp_path, capsys):
    """2 channels, labels 0..2, 1.5 x 1 x 3 mm (one case at 1.2 mm, resampled to the median and
    back), one header-bad and one voxel-bad case: train one short epoch, predict on the input grid,
    evaluate per label, all through the commands the trainer prints."""
    spacings = {f"case_{i}": SPACING for i in range(6)} | {"case_6": (1.2, 1.0, 3.0)}
    root = write_nnunet(tmp_path / "Dataset900_Tiny", spacings | {"broken": SPACING, "badlab": SPACING})
    (root / "imagesTr" / "broken_0001.nii.gz").unlink()  # header-level: never enters the split
    lab = nib.load(str(root / "labelsTr" / "badlab.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj) * 4, lab.affine), str(root / "labelsTr" / "badlab.nii.gz"))
    split = {"train": ["badlab", "case_0", "case_1", "case_2", "case_3"], "val": ["case_4"], "test": ["case_5", "case_6"]}
    (root / "split.json").write_text(json.dumps(split))
    run = tmp_path / "run"
    assert train.main(["--data", str(root), "--epochs", "1", "--iters-per-epoch", "2", "--batch-size", "1",
                       "--out", str(run), *FAST, *QUIET]) == 0
    out = capsys.readouterr().out
    assert "skipping 2 bad case(s)" in out and "badlab.nii.gz has labels [4, 8] outside {0, 1, 2}" in out
    assert "case broken: missing channel 0001 (ADC) file" in out
    assert "broken" not in json.loads((run / "split.json").read_text())["train"]
    final = next(l for l in out.splitlines() if l.startswith("final validation Dice"))
    assert "(1 validation case(s))" in final and "lesion" in final and "organ" in final
    ckpt = load_checkpoint(run / "best.pt")
    ds = ckpt["train_config"]["dataset"]
    assert ds["layout"] == "nnunet" and [c["name"] for c in ds["channels"]] == ["T2", "ADC"]
    assert ds["label_values"] == [0, 1, 2] and ds["spacing"] == [1.5, 1.0, 3.0]  # the median spacing
    assert ckpt["model_config"]["in_chans"] == 2 and ckpt["model_config"]["out_chans"] == 3
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,train_loss,lr,val_lesion,val_organ,val_mean")

    # The summary's commands, run as printed (paths relative to the working directory or absolute).
    lines = out[out.index("held-out test split (2 case(s))"):].splitlines()[1:3]
    pred_cmd, eval_cmd = (shlex.split(l.strip()) for l in lines)
    assert pred_cmd[1:3] == ["-m", "segmamba.predict"] and eval_cmd[1:3] == ["-m", "segmamba.evaluate"]
    assert predict.main(pred_cmd[3:] + ["--no-progress"]) == 0
    pred_dir = Path(pred_cmd[pred_cmd.index("--out") + 1])
    assert sorted(p.name for p in pred_dir.glob("*.nii.gz")) == ["case_5.nii.gz", "case_6.nii.gz"]
    for name in ("case_5", "case_6"):  # on the input's grid: its shape, affine and header
        src = nib.load(str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        img = nib.load(str(pred_dir / f"{name}.nii.gz"))
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-6)
        np.testing.assert_allclose(img.header.get_zooms(), src.header.get_zooms())
        assert set(np.unique(np.asarray(img.dataobj)).tolist()) <= {0, 1, 2}
    assert evaluate.main(eval_cmd[3:] + ["--no-progress"]) == 0
    rows = list(csv.DictReader(open(pred_dir / "scores.csv")))
    assert [r["case"] for r in rows] == ["case_5", "case_6"]
    assert set(rows[0]) == {"case", "Dice_lesion", "Dice_organ", "HD95_lesion", "HD95_organ"}
    assert "Dice_organ" in capsys.readouterr().out

    # An images folder (imagesTs) works as --input too: a case missing a channel is named, the other
    # written on its own grid; a labelsTr works as --ref, naming a reference with labels outside the set.
    (root / "imagesTs").mkdir()
    image, _ = phantom((1.2, 1.0, 3.0), 7)
    for c in range(2):
        nib.save(nib.Nifti1Image(image[c], oblique((1.2, 1.0, 3.0))), str(root / "imagesTs" / f"tst_0_{c:04d}.nii.gz"))
    nib.save(nib.Nifti1Image(image[0], oblique((1.2, 1.0, 3.0))), str(root / "imagesTs" / "tst_1_0000.nii.gz"))
    for c in range(3):
        nib.save(nib.Nifti1Image(image[0], oblique((1.2, 1.0, 3.0))), str(root / "imagesTs" / f"tst_2_{c:04d}.nii.gz"))
    ts = tmp_path / "ts"
    assert predict.main(["--checkpoint", str(run / "best.pt"), "--input", str(root / "imagesTs"), "--out", str(ts),
                         "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "tst_1: case tst_1: missing channel 0001 (ADC) file" in err
    assert "tst_2: case tst_2: 3 image files for 2 channels (T2, ADC)" in err
    assert [p.name for p in ts.glob("*.nii.gz")] == ["tst_0.nii.gz"]
    assert nib.load(str(ts / "tst_0.nii.gz")).shape == image.shape[1:]
    (pred_dir / "badlab.nii.gz").write_bytes((pred_dir / "case_5.nii.gz").read_bytes())
    assert evaluate.main(["--pred", str(pred_dir), "--ref", str(root / "labelsTr"), "--no-progress"]) == 1
    assert "badlab" in capsys.readouterr().err and len(list(csv.DictReader(open(pred_dir / "scores.csv")))) == 2


def test_task_tissue_generates_nnunet_set_and_trains(tmp_path, capsys):
    data = tmp_path / "tissue"
    args = ["--task", "tissue", "--synth-dir", str(data), "--synth-cases", "4", "--synth-spacing", "8", "--epochs", "1",
            "--iters-per-epoch", "1", "--batch-size", "1", "--out", str(tmp_path / "run"), *FAST, *QUIET]
    assert train.main(args) == 0
    assert json.loads((data / "synth.json").read_text())["task"] == "tissue"
    assert (data / "dataset.json").is_file() and open_dataset(data).description.layout == "nnunet"
    out = capsys.readouterr().out
    final = next(l for l in out.splitlines() if l.startswith("final validation Dice"))
    assert all(name in final for name in ("CSF", "GM", "WM"))
    with pytest.raises(SystemExit):
        train.main(["--task", "tissue", "--data", str(data)])
    assert "--task: picks an embedded data set" in capsys.readouterr().err


def test_cache_rebuilds_an_entry_whose_source_changed(tmp_path):
    root = write_nnunet(tmp_path / "D", {"c0": SPACING, "c1": SPACING})
    src = open_dataset(root)
    desc = src.description.planned(SPACING, [])
    first, _ = build_cache(src.cases, tmp_path / "cache", desc)
    before = np.array(first[0].image())
    image, _ = phantom(SPACING, 5)
    nib.save(nib.Nifti1Image(image[0] * 3.0 + 1.0, oblique(SPACING)), str(root / "imagesTr" / "c0_0000.nii.gz"))
    again, _ = build_cache(src.cases, tmp_path / "cache", desc)
    assert again[0].folder == first[0].folder
    assert not np.array_equal(np.array(again[0].image()), before)
    expected, _, _ = preprocess_case(load_case(src.cases[0], desc).image, SPACING, desc)
    np.testing.assert_array_equal(again[0].image(), expected)
    # another target spacing is another cache entry
    other, _ = build_cache(src.cases, tmp_path / "cache", src.description.planned((3.0, 2.0, 3.0), []))
    assert other[0].folder.parent != first[0].folder.parent and other[0].image().shape[2:] == (16, 12)


def test_region_based_prediction_writes_labels_by_class_order(tmp_path):
    desc = nnunet_description({"channel_names": {"0": "T1"}, "numTraining": 1, "file_ending": ".nii.gz",
                               "labels": {"background": 0, "outer": [1, 2], "inner": 2},
                               "regions_class_order": [1, 2]})
    image = np.zeros((1, 12, 10, 8), np.float32)
    image[0, 2:10, 2:8, 1:7] = 1.0   # outer region
    image[0, 4:7, 4:6, 3:5] = 3.0    # inner region
    case = predict.Case("x", image, None, np.eye(4), nib.Nifti1Header(), (1.0, 1.0, 1.0))
    net = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():  # z-scored input: outer logit > 0 wherever there is signal, inner only on the bright part
        net.weight.copy_(torch.tensor([100.0, 10.0]).view(2, 1, 1, 1, 1))
        net.bias.copy_(torch.tensor([50.0, -10.0]))
    labels = predict.predict_case(net.eval(), case, (8, 8, 8), description=desc)
    expected = np.zeros(image.shape[1:], np.uint8)
    expected[image[0] > 0] = 1
    expected[image[0] > 2] = 2
    np.testing.assert_array_equal(labels, expected)


def test_spacing_option():
    from segmamba.training import config
    assert config.parse([]).spacing == "median" and config.parse(["--spacing", "native"]).spacing == "native"
    assert config.parse(["--spacing", "1.5", "1", "3"]).spacing == [1.5, 1.0, 3.0]
    for bad in (["1", "2"], ["fine"], ["1", "0", "1"]):
        with pytest.raises(SystemExit):
            config.parse(["--spacing", *bad])
