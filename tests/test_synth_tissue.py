"""The embedded brain-tissue task: nnU-Net v2 layout, labels, anatomy, contrast, determinism, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmamba.data import synth, synth_tissue
from segmamba.data.synth_tissue import case_name, tissue_labels, write_tissue_dataset

SPACING = 4.0  # 50x59x48 volumes: cortex and ventricles still there, about a second per case
CASES = 3


@pytest.fixture(scope="module")
def tissue_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tissue")
    write_tissue_dataset(root, CASES, seed=5, spacing=SPACING)
    return root


def _case(root: Path, i: int) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    name = case_name(i)
    return (nib.load(str(root / "imagesTr" / f"{name}_0000.nii.gz")),
            nib.load(str(root / "labelsTr" / f"{name}.nii.gz")))


def _arrays(root: Path, i: int) -> tuple[np.ndarray, np.ndarray]:
    image, label = _case(root, i)
    return np.asarray(image.dataobj), np.asarray(label.dataobj)


def test_nnunet_layout_and_dataset_json(tissue_root):
    assert sorted(p.name for p in tissue_root.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    assert sorted(p.name for p in (tissue_root / "imagesTr").iterdir()) == \
        [f"tissue_{i:03d}_0000.nii.gz" for i in range(CASES)]
    assert sorted(p.name for p in (tissue_root / "labelsTr").iterdir()) == \
        [f"tissue_{i:03d}.nii.gz" for i in range(CASES)]
    meta = json.loads((tissue_root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1"}
    assert meta["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
    assert type(meta["numTraining"]) is int and meta["numTraining"] == CASES
    assert meta["file_ending"] == ".nii.gz"
    assert all(type(v) is int for v in meta["labels"].values())


def test_geometry_labels_and_tissue_fractions(tissue_root):
    for i in range(CASES):
        image, label = _case(tissue_root, i)
        assert image.shape == label.shape and image.ndim == 3
        np.testing.assert_array_equal(image.affine, label.affine)
        assert image.header.get_zooms() == (SPACING,) * 3
        img, lab = np.asarray(image.dataobj), np.asarray(label.dataobj)
        assert img.dtype == np.float32 and lab.dtype == np.uint8
        assert set(np.unique(lab)) == {0, 1, 2, 3}
        brain = lab > 0
        # Skull-stripped like the template: signal exactly where the brain is.
        assert np.all(img[brain] > 0) and np.all(img[~brain] == 0)
        # The adult brain: a litre or more, mostly grey and white matter, some CSF.
        assert brain.sum() * SPACING ** 3 > 1.0e6
        csf, gm, wm = ((lab == k).sum() / brain.sum() for k in (1, 2, 3))
        assert 0.05 < csf < 0.30 and 0.35 < gm < 0.70 and 0.20 < wm < 0.50, (csf, gm, wm)


def test_t1_contrast_varies_and_is_not_a_threshold(tissue_root):
    ratios = []
    for i in range(CASES):
        img, lab = _arrays(tissue_root, i)
        med = {k: np.median(img[lab == k]) for k in (1, 2, 3)}
        assert med[3] > med[2] > med[1]                         # T1: WM bright, GM mid, CSF dark
        ratios.append(med[2] / med[3])
        # Partial volume, bias field and noise: the classes' intensities overlap, so no single
        # threshold separates GM from WM.
        assert np.mean(img[lab == 2] > np.percentile(img[lab == 3], 10)) > 0.03
        assert np.mean(img[lab == 3] < np.percentile(img[lab == 2], 90)) > 0.03
    assert max(ratios) - min(ratios) > 0.01                     # per-case random contrast


def test_tissue_labels_rule():
    brain = np.array([True, True, True, True, True, False])
    gm = np.array([0.1, 0.6, 0.3, 0.4, 0.5, 0.9])
    wm = np.array([0.1, 0.3, 0.6, 0.4, 0.0, 0.0])
    # CSF = 1 - GM - WM: 0.8, 0.1, 0.1, 0.2, 0.5 -> CSF, GM, WM, GM (tie GM/WM: lower label),
    # CSF (tie CSF/GM: lower label); outside the brain: background.
    np.testing.assert_array_equal(tissue_labels(brain, gm, wm), [1, 2, 3, 2, 1, 0])


def test_deterministic_per_seed_and_cases_differ(tissue_root, tmp_path):
    write_tissue_dataset(tmp_path / "again", 1, seed=5, spacing=SPACING)
    write_tissue_dataset(tmp_path / "other", 1, seed=6, spacing=SPACING)
    a_img, a_lab = _arrays(tissue_root, 0)
    b_img, b_lab = _arrays(tmp_path / "again", 0)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, c_lab = _arrays(tmp_path / "other", 0)
    assert not np.array_equal(a_lab, c_lab)
    d_img, d_lab = _arrays(tissue_root, 1)
    assert not np.array_equal(a_lab, d_lab) and not np.array_equal(a_img, d_img)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cases: expected at least 1, got 0"):
        write_tissue_dataset(tmp_path, 0, seed=0, spacing=SPACING)
    with pytest.raises(ValueError, match="spacing: expected a positive number of mm, got -1"):
        write_tissue_dataset(tmp_path, 1, seed=0, spacing=-1.0)


def test_cli_tissue_and_tumour(tmp_path, capsys):
    synth.main(["--task", "tissue", "--out", str(tmp_path / "t"), "--cases", "1", "--spacing", "8", "--seed", "2"])
    meta = json.loads((tmp_path / "t" / "dataset.json").read_text())
    assert meta["numTraining"] == 1
    img = nib.load(str(tmp_path / "t" / "imagesTr" / "tissue_000_0000.nii.gz"))
    assert img.header.get_zooms() == (8.0,) * 3
    # The default task is the tumour set, as before.
    synth.main(["--out", str(tmp_path / "b"), "--cases", "1", "--spacing", "8"])
    assert (tmp_path / "b" / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz").is_file()
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path / "c")])
    assert "--cases is required for --task tumour" in capsys.readouterr().err


def test_cli_tissue_defaults(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(synth_tissue, "write_tissue_dataset", lambda out, cases, seed, spacing: seen.update(
        out=out, cases=cases, seed=seed, spacing=spacing))
    synth.main(["--task", "tissue", "--out", str(tmp_path)])
    assert seen == {"out": tmp_path, **synth_tissue.TISSUE_DEFAULTS}
