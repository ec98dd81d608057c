"""segmamba.metrics / segmamba.evaluate: Dice and HD95 against hand-computed values, an independent
brute-force HD95, MONAI's metric classes, the empty-mask conventions and the CLI."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from scipy import ndimage

from segmamba.evaluate import main
from segmamba.metrics import binary_scores, image_diagonal_mm, region_scores


def box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius ** 2


def brute_hd95(a: np.ndarray, b: np.ndarray, spacing, pooled: bool = False) -> float:
    """Surface voxels (mask minus its 6-connected erosion), all pairwise distances in mm, 95th percentile
    (linear) per direction and the larger one; or, `pooled`, of both directions together (medpy)."""
    pa = np.argwhere(a & ~ndimage.binary_erosion(a)) * np.asarray(spacing)
    pb = np.argwhere(b & ~ndimage.binary_erosion(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    ab, ba = d.min(1), d.min(0)
    if pooled:
        return float(np.percentile(np.concatenate([ab, ba]), 95))
    return float(max(np.percentile(ab, 95), np.percentile(ba, 95)))


# ---------------------------------------------------------------- hand-computed values

def test_single_voxels_anisotropic():
    spacing = (1.0, 2.0, 0.5)
    a, b = box((9, 9, 9), (3, 4, 5), (4, 5, 6)), box((9, 9, 9), (4, 6, 8), (5, 7, 9))
    s = binary_scores(a, b, spacing)
    assert s["Dice"] == 0.0
    assert s["HD95"] == pytest.approx(math.sqrt(1.0 ** 2 + (2 * 2.0) ** 2 + (3 * 0.5) ** 2), rel=1e-6)


@pytest.mark.parametrize("axis,gap", [(0, 3), (2, 4)])
def test_parallel_plates_anisotropic(axis, gap):
    # Every voxel of a one-voxel plate is a surface voxel and its nearest voxel of the other plate lies
    # straight across, so every surface distance in both directions is gap * spacing[axis].
    spacing = (0.8, 1.1, 2.5)
    lo, hi = [2, 3, 1], [9, 8, 7]
    lo[axis], hi[axis] = 1, 2
    a = box((12, 12, 12), lo, hi)
    b = np.roll(a, gap, axis=axis)
    s = binary_scores(a, b, spacing)
    assert s["Dice"] == 0.0
    assert s["HD95"] == pytest.approx(gap * spacing[axis], rel=1e-6)


def test_concentric_cubes():
    # Inner cube 10^3 (488 surface voxels, each exactly 1 voxel from the outer surface) inside 12^3
    # (728 surface voxels: 600 face voxels at 1, 120 edge voxels at sqrt 2, 8 corners at sqrt 3).
    # Sorted outer->inner distances: the 95th percentile sits at rank 0.95 * 727 = 690.65, between ranks
    # 690 and 691, both in the sqrt 2 block (ranks 600..719): HD95 = max(1, sqrt 2) = sqrt 2.
    a, b = box((16, 16, 16), (3, 3, 3), (13, 13, 13)), box((16, 16, 16), (2, 2, 2), (14, 14, 14))
    s = binary_scores(a, b, (1.0, 1.0, 1.0))
    assert s["Dice"] == pytest.approx(2 * 1000 / (1000 + 1728), rel=1e-6)
    assert s["HD95"] == pytest.approx(math.sqrt(2), rel=1e-6)
    s = binary_scores(a, b, (1.5, 1.5, 1.5))  # isotropic scaling scales the distance
    assert s["HD95"] == pytest.approx(1.5 * math.sqrt(2), rel=1e-6)


def test_shifted_cubes_dice():
    a, b = box((20, 14, 14), (2, 2, 2), (12, 12, 12)), box((20, 14, 14), (5, 2, 2), (15, 12, 12))
    assert binary_scores(a, b, (1.0, 1.0, 3.0))["Dice"] == pytest.approx(0.7, rel=1e-6)  # 700 of 1000


def test_concentric_balls_near_radius_difference():
    # Two concentric balls of radii 4 and 9 mm on a 0.7 x 1 x 1.6 mm grid: surfaces about 5 mm apart,
    # to within the voxel discretisation of each surface.
    spacing = (0.7, 1.0, 1.6)
    shape = (40, 30, 20)
    centre = (20, 15, 10)
    a, b = ball(shape, centre, 4.0, spacing), ball(shape, centre, 9.0, spacing)
    s = binary_scores(a, b, spacing)
    assert abs(s["HD95"] - 5.0) < 1.6
    assert s["Dice"] == pytest.approx(2 * a.sum() / (a.sum() + b.sum()), rel=1e-6)


# ---------------------------------------------------------------- brute force and MONAI classes

@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.6, 1.2, 2.8)])
def test_hd95_is_monai_per_direction_definition(spacing):
    shape = (24, 20, 16)
    # b has a separate far blob: ref->pred distances have a long tail that pred->ref lacks, which is
    # where per-direction and pooled percentiles part.
    a = ball(shape, (8, 9, 8), 5.0, spacing)
    b = ball(shape, (9, 9, 8), 5.0, spacing) | box(shape, (18, 4, 3), (21, 8, 7))
    s = binary_scores(a, b, spacing)
    per_direction, pooled = brute_hd95(a, b, spacing), brute_hd95(a, b, spacing, pooled=True)
    assert s["HD95"] == pytest.approx(per_direction, rel=1e-5)
    assert abs(per_direction - pooled) > 0.5  # the two definitions really differ on this pair
    assert s["Dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), rel=1e-6)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI-internal
def test_region_scores_match_monai_metric_classes():
    rng = np.random.default_rng(3)
    shape, spacing = (30, 26, 22), (0.9, 1.0, 2.0)
    ref = np.zeros(shape, np.uint8)
    ref[ball(shape, (15, 13, 11), 9.0, spacing)] = 2
    ref[ball(shape, (15, 13, 11), 6.0, spacing)] = 3
    ref[ball(shape, (15, 13, 11), 3.0, spacing)] = 1
    pred = np.roll(ref, (1, -2, 1), axis=(0, 1, 2))
    pred[rng.random(shape) < 0.01] = 2  # scattered false positives
    ours = region_scores(pred, ref, spacing)
    masks = lambda lab: torch.from_numpy(np.stack([np.isin(lab, v) for v in ((1, 2, 3), (1, 3), (3,))]))[None].float()
    dice = DiceMetric(include_background=True, reduction="none")(masks(pred), masks(ref))[0]
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
        masks(pred), masks(ref), spacing=list(spacing))[0]
    for i, region in enumerate(("WT", "TC", "ET")):
        assert ours[region]["Dice"] == pytest.approx(float(dice[i]), rel=1e-6)
        assert ours[region]["HD95"] == pytest.approx(float(hd[i]), rel=1e-6)
        assert 0.0 < ours[region]["Dice"] < 1.0 and ours[region]["HD95"] > 0.0


# ---------------------------------------------------------------- empty masks

def test_empty_mask_conventions():
    shape, spacing = (10, 12, 14), (1.0, 2.0, 3.0)
    diag = math.sqrt(10.0 ** 2 + 24.0 ** 2 + 42.0 ** 2)
    empty, some = np.zeros(shape, bool), box(shape, (2, 2, 2), (5, 5, 5))
    assert binary_scores(empty, empty, spacing) == {"Dice": 1.0, "HD95": 0.0}
    assert binary_scores(empty, some, spacing) == {"Dice": 0.0, "HD95": pytest.approx(diag)}
    assert binary_scores(some, empty, spacing) == {"Dice": 0.0, "HD95": pytest.approx(diag)}


def test_brats_penalty_on_full_size_volume():
    assert image_diagonal_mm((240, 240, 155), (1.0, 1.0, 1.0)) == pytest.approx(373.13, abs=0.005)
    shape = (240, 240, 155)
    ref = np.zeros(shape, np.uint8)
    ref[100:110, 100:110, 70:80] = 2
    ref[103:106, 103:106, 73:76] = 3
    pred = np.where(ref == 3, 1, ref).astype(np.uint8)  # ET missed, called necrosis: TC unchanged
    s = region_scores(pred, ref, (1.0, 1.0, 1.0))
    assert s["WT"] == {"Dice": 1.0, "HD95": 0.0} and s["TC"] == {"Dice": 1.0, "HD95": 0.0}
    assert s["ET"]["Dice"] == 0.0 and s["ET"]["HD95"] == pytest.approx(373.13, abs=0.005)


def test_shape_mismatch_and_bad_spacing():
    with pytest.raises(ValueError, match="shape"):
        region_scores(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        binary_scores(np.ones((4, 4, 4), bool), np.ones((4, 4, 4), bool), (1.0, 0.0, 1.0))


# ---------------------------------------------------------------- command line

def _save(path: Path, labels: np.ndarray, zooms=(1.0, 1.0, 2.5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.diag([*zooms, 1.0])), str(path))
    return path


def _labels(shape, shift=0) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[4:14, 4:12, 2 + shift:8 + shift] = 2
    lab[6:10, 6:10, 3 + shift:6 + shift] = 3
    return lab


def test_cli_both_layouts_csv_summary_and_failures(tmp_path, capsys):
    shape = (18, 16, 12)
    ref_dirs, ref_flat, pred = tmp_path / "ref", tmp_path / "flat", tmp_path / "pred"
    for name, shift in (("A-1", 0), ("B-2", 1)):
        _save(ref_dirs / name / f"{name}-seg.nii.gz", _labels(shape))
        _save(ref_flat / f"{name}-seg.nii.gz", _labels(shape))
        _save(pred / f"{name}.nii.gz", _labels(shape, shift))
    _save(ref_dirs / "Z-9" / "Z-9-seg.nii.gz", _labels(shape))  # reference without prediction: ignored
    for ref in (ref_dirs, ref_flat):
        out = tmp_path / f"{ref.name}.csv"
        assert main(["--pred", str(pred), "--ref", str(ref), "--csv", str(out), "--no-progress"]) == 0
        rows = list(csv.DictReader(open(out)))
        assert [r["case"] for r in rows] == ["A-1", "B-2"]
        assert float(rows[0]["Dice_WT"]) == 1.0 and float(rows[0]["HD95_ET"]) == 0.0
        # B-2 is shifted one slice along z, where the header says 2.5 mm: plates of surface 2.5 mm apart
        expected = region_scores(_labels(shape, 1), _labels(shape), (1.0, 1.0, 2.5))
        for region in ("WT", "TC", "ET"):
            assert float(rows[1][f"Dice_{region}"]) == pytest.approx(expected[region]["Dice"], abs=1e-6)
            assert float(rows[1][f"HD95_{region}"]) == pytest.approx(expected[region]["HD95"], abs=1e-5)
        assert float(rows[1]["HD95_WT"]) == pytest.approx(2.5, abs=1e-5)
        printed = capsys.readouterr().out
        assert "mean" in printed and "median" in printed and "Dice_WT" in printed and "HD95_mean" in printed

    # a shape mismatch, an unreadable file and a missing reference are reported; the rest is scored
    _save(pred / "C-3.nii.gz", _labels((18, 16, 13)))
    _save(ref_flat / "C-3.nii.gz", _labels(shape))
    (pred / "D-4.nii.gz").write_bytes(b"not a nifti file")
    _save(ref_flat / "D-4-seg.nii.gz", _labels(shape))
    _save(pred / "E-5-seg.nii.gz", _labels(shape))
    out = tmp_path / "bad.csv"
    assert main(["--pred", str(pred), "--ref", str(ref_flat), "--csv", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "C-3.nii.gz: shape (18, 16, 13) differs" in err
    assert "D-4.nii.gz" in err and "cannot read" in err
    assert "case E-5: no reference" in err
    assert [r["case"] for r in csv.DictReader(open(out))] == ["A-1", "B-2"]


def test_cli_affine_mismatch_and_missing_folder(tmp_path, capsys):
    _save(tmp_path / "pred" / "A-1.nii.gz", _labels((18, 16, 12)), zooms=(1.0, 1.0, 2.5))
    _save(tmp_path / "ref" / "A-1-seg.nii.gz", _labels((18, 16, 12)), zooms=(1.0, 1.0, 1.0))
    assert main(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--no-progress"]) == 1
    assert "affine differs from the reference" in capsys.readouterr().err
    assert main(["--pred", str(tmp_path / "nope"), "--ref", str(tmp_path / "ref")]) == 2
    assert "--pred: not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------- pooled HD95 (medpy, public SegMamba script)

def _plate_and_line(shape=(14, 14, 16)) -> tuple[np.ndarray, np.ndarray]:
    """a: a 10x10 plate one voxel thick at z=1; b: the same plate at z=3 plus a 10-voxel line at z=13
    right above a. Every voxel is a surface voxel. Surface distances, in units of the z spacing dz:
    a->b 100 x 2; b->a 100 x 2 and 10 x 12 (straight down, a covers the line's footprint)."""
    a = box(shape, (2, 2, 1), (12, 12, 2))
    b = box(shape, (2, 2, 3), (12, 12, 4)) | box(shape, (2, 5, 13), (12, 6, 14))
    return a, b


def test_hd95_pooled_against_hand_computed_value(tmp_path, capsys):
    spacing = (0.8, 1.1, 1.5)
    a, b = _plate_and_line()
    # Per direction (MONAI): b->a has 110 distances; the 95th percentile sits at rank 0.95 * 109 = 103.55,
    # inside the 10 values of 12 dz: 18 mm. Pooled (medpy): 210 distances; rank 0.95 * 209 = 198.55 falls
    # among the 200 values of 2 dz: 3 mm.
    assert binary_scores(a, b, spacing)["HD95"] == pytest.approx(12 * 1.5, rel=1e-6)
    assert binary_scores(a, b, spacing, hd95="pooled")["HD95"] == pytest.approx(2 * 1.5, rel=1e-6)
    assert binary_scores(a, b, spacing, hd95="pooled")["HD95"] == pytest.approx(brute_hd95(a, b, spacing, pooled=True))
    assert binary_scores(a, b, spacing, hd95="pooled")["Dice"] == 0.0
    empty = np.zeros_like(a)
    assert binary_scores(empty, empty, spacing, hd95="pooled") == {"Dice": 1.0, "HD95": 0.0}
    with pytest.raises(ValueError, match="hd95: expected one of"):
        binary_scores(a, b, spacing, hd95="medpy")
    # the command line: WT of label-2 masks (TC, ET empty on both sides)
    _save(tmp_path / "pred" / "P-1.nii.gz", a * 2, zooms=spacing)
    _save(tmp_path / "ref" / "P-1.nii.gz", b * 2, zooms=spacing)
    for mode, expected in (("monai", 18.0), ("pooled", 3.0)):
        out = tmp_path / f"{mode}.csv"
        assert main(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--hd95", mode,
                     "--csv", str(out), "--no-progress"]) == 0
        row = next(csv.DictReader(open(out)))
        assert float(row["HD95_WT"]) == pytest.approx(expected, rel=1e-5) and float(row["HD95_ET"]) == 0.0
        assert f"HD95 {mode}" in capsys.readouterr().out
