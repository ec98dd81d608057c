"""BraTS loader, checks on broken cases, preprocessing, regions, cache, split, synthetic set, patches."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segmamba.data import cache, synth
from segmamba.data.brats import MODALITIES, CaseError, case_files, find_cases, load_case
from segmamba.data.dataset import PatchDataset, RankSampler, epoch_schedule
from segmamba.data.preprocess import foreground_bbox, normalize_nonzero, preprocess
from segmamba.data.regions import REGIONS, labels_to_regions
from segmamba.data.split import load_or_create_split, make_split

SPACING = 6.0  # 33x39x32 volumes: a few hundred ms per case


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth.write_dataset(root, 3, seed=5, spacing=SPACING)
    return root


@pytest.fixture
def case_copy(synth_root, tmp_path) -> Path:
    src = synth_root / synth.case_name(0)
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _nifti(path: Path) -> nib.Nifti1Image:
    return nib.load(str(path))


def _write(img_like: nib.Nifti1Image, data: np.ndarray, path: Path, affine=None) -> None:
    nib.save(nib.Nifti1Image(data, img_like.affine if affine is None else affine), str(path))


# ---------------------------------------------------------------- synthetic set

def test_synth_layout_labels_and_geometry(synth_root):
    cases = find_cases(synth_root)
    assert [c.name for c in cases] == [f"BraTS-GLI-{i:05d}-000" for i in range(3)]
    for c in cases:
        names = sorted(p.name for p in c.iterdir())
        assert names == sorted(f"{c.name}-{k}.nii.gz" for k in ("t1c", "t1n", "t2f", "t2w", "seg"))
        case = load_case(c)
        assert case.spacing == (SPACING,) * 3
        assert set(np.unique(case.label)) == {0, 1, 2, 3}
        # The lesion lies in the brain: every labelled voxel has signal in all modalities.
        assert np.all(case.image[:, case.label > 0] > 0)


def test_synth_contrasts_follow_mri_appearance(synth_root):
    """The classes must be told apart the way a radiologist does, per modality."""
    case = load_case(synth_root / synth.case_name(1))
    mean = {m: {k: case.image[i][case.label == k].mean() for k in (1, 2, 3)} for i, m in enumerate(MODALITIES)}
    assert mean["t1c"][3] > 1.25 * mean["t1c"][2]       # enhancing rim bright after contrast
    assert mean["t1n"][3] < 1.3 * mean["t1n"][2]        # ...but not before it
    assert mean["t2f"][2] > 1.5 * mean["t2f"][1]        # oedema brightest on FLAIR
    assert mean["t2w"][1] > mean["t2w"][3]              # fluid-filled necrosis bright on T2
    # CSF is dark on FLAIR and bright on T2: voxels brightest on T2 among healthy brain are dim on FLAIR.
    healthy = (case.label == 0) & (case.image[0] > 0)
    t2, flair = case.image[0][healthy], case.image[1][healthy]
    fluid = t2 > np.percentile(t2, 95)
    assert flair[fluid].mean() < flair.mean()


def test_synth_is_reproducible(tmp_path):
    a = synth.write_dataset(tmp_path / "a", 1, seed=3, spacing=SPACING)[0]
    b = synth.write_dataset(tmp_path / "b", 1, seed=3, spacing=SPACING)[0]
    c = synth.write_dataset(tmp_path / "c", 1, seed=4, spacing=SPACING)[0]
    ca, cb, cc = load_case(a), load_case(b), load_case(c)
    np.testing.assert_array_equal(ca.image, cb.image)
    np.testing.assert_array_equal(ca.label, cb.label)
    assert not np.array_equal(ca.label, cc.label)


def test_synth_cli(tmp_path, capsys):
    synth.main(["--out", str(tmp_path), "--cases", "1", "--seed", "1", "--spacing", "8"])
    assert (tmp_path / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz").is_file()
    with pytest.raises(ValueError, match="cases"):
        synth.write_dataset(tmp_path, 0)


# ---------------------------------------------------------------- loader

def test_load_case_channel_order_and_types(synth_root):
    d = synth_root / synth.case_name(0)
    case = load_case(d)
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert case.image.shape == (4,) + case.label.shape
    for i, m in enumerate(MODALITIES):
        np.testing.assert_array_equal(case.image[i], _nifti(d / f"{d.name}-{m}.nii.gz").get_fdata(dtype=np.float32))
    np.testing.assert_allclose(case.affine, _nifti(d / f"{d.name}-t2w.nii.gz").affine)
    reordered = load_case(d, modalities=("t1c", "t2w"), with_label=False)
    assert reordered.label is None
    np.testing.assert_array_equal(reordered.image[0], case.image[3])
    assert list(case_files(d, with_label=False)) == list(MODALITIES)


def test_missing_modality(case_copy):
    (case_copy / f"{case_copy.name}-t1c.nii.gz").unlink()
    with pytest.raises(CaseError, match=rf"{case_copy.name}.*missing t1c"):
        load_case(case_copy)
    assert load_case(case_copy, modalities=("t2w", "t2f", "t1n")).image.shape[0] == 3


def test_shape_mismatch(case_copy):
    p = case_copy / f"{case_copy.name}-t2f.nii.gz"
    img = _nifti(p)
    _write(img, img.get_fdata()[:-1], p)
    with pytest.raises(CaseError, match=rf"{case_copy.name}.*t2f.nii.gz has shape"):
        load_case(case_copy)


def test_affine_mismatch(case_copy):
    p = case_copy / f"{case_copy.name}-t1n.nii.gz"
    img = _nifti(p)
    affine = img.affine.copy()
    affine[0, 3] += 5.0
    _write(img, img.get_fdata(), p, affine)
    with pytest.raises(CaseError, match=rf"{case_copy.name}.*t1n.nii.gz has a different affine"):
        load_case(case_copy)


def test_bad_label(case_copy):
    p = case_copy / f"{case_copy.name}-seg.nii.gz"
    img = _nifti(p)
    seg = img.get_fdata().astype(np.uint8)
    seg[0, 0, 0] = 5
    _write(img, seg, p)
    with pytest.raises(CaseError, match=r"labels \[5\] outside"):
        load_case(case_copy)


def test_label_4_mapped_to_3_with_warning(case_copy):
    p = case_copy / f"{case_copy.name}-seg.nii.gz"
    img = _nifti(p)
    seg = img.get_fdata().astype(np.uint8)
    old = seg.copy()
    seg[seg == 3] = 4
    _write(img, seg, p)
    with pytest.warns(UserWarning, match="label 4"):
        case = load_case(case_copy)
    np.testing.assert_array_equal(case.label, old)


def test_corrupt_file(case_copy):
    p = case_copy / f"{case_copy.name}-t2w.nii.gz"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])  # truncated download
    with pytest.raises(CaseError, match=rf"{case_copy.name}: cannot read .*t2w.nii.gz"):
        load_case(case_copy)
    p.write_bytes(gzip.compress(b"not a nifti file"))
    with pytest.raises(CaseError, match="cannot read"):
        load_case(case_copy)


def test_find_cases_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_cases(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no case folders"):
        find_cases(tmp_path)


# ---------------------------------------------------------------- preprocessing, regions

def test_preprocess_crops_and_normalises():
    rng = np.random.default_rng(0)
    image = np.zeros((2, 9, 11, 7), np.float32)
    image[0, 2:5, 3:9, 1:4] = rng.uniform(1, 5, (3, 6, 3))
    image[1, 3:6, 4:8, 2:6] = rng.uniform(10, 50, (3, 4, 4))
    bbox = foreground_bbox(image)
    assert bbox == (slice(2, 6), slice(3, 9), slice(1, 6))
    out, bbox2 = preprocess(image)
    assert bbox2 == bbox and out.shape == (2, 4, 6, 5)
    for c in range(2):
        src = image[(c,) + bbox]
        nz = src != 0
        expect = (src[nz].astype(np.float64) - src[nz].mean()) / src[nz].std()
        np.testing.assert_allclose(out[c][nz], expect, rtol=1e-5, atol=1e-6)
        assert np.all(out[c][~nz] == 0)
    # A constant channel is centred, not divided by zero; an empty one stays empty.
    const = normalize_nonzero(np.stack([np.full((2, 2, 2), 7.0), np.zeros((2, 2, 2))]).astype(np.float32))
    assert np.all(const == 0) and np.isfinite(const).all()
    with pytest.raises(ValueError, match=r"image: expected shape \(C, X, Y, Z\)"):
        foreground_bbox(np.zeros((3, 3, 3)))


def test_regions_numpy_and_torch():
    label = np.array([[0, 1], [2, 3]], np.uint8)
    expected = np.array([[[0, 1], [1, 1]], [[0, 1], [0, 1]], [[0, 0], [0, 1]]], bool)  # WT, TC, ET
    assert REGIONS == ("WT", "TC", "ET")
    np.testing.assert_array_equal(labels_to_regions(label), expected)
    np.testing.assert_array_equal(labels_to_regions(torch.from_numpy(label).long()).numpy(), expected)
    np.testing.assert_array_equal(labels_to_regions(label.astype(np.float32)), expected)


# ---------------------------------------------------------------- cache and split

def test_cache_skips_bad_cases_and_is_reused(synth_root, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    (data / synth.case_name(2) / f"{synth.case_name(2)}-t2f.nii.gz").unlink()
    good, bad = cache.build_cache(find_cases(data), tmp_path / "cache")
    assert [c.name for c in good] == [synth.case_name(0), synth.case_name(1)]
    assert list(bad) == [synth.case_name(2)] and "missing t2f" in bad[synth.case_name(2)]
    full = load_case(data / synth.case_name(0))
    image, bbox = preprocess(full.image)
    np.testing.assert_array_equal(good[0].image(), image)
    np.testing.assert_array_equal(good[0].label(), full.label[bbox])
    meta = json.loads((good[0].folder / "meta.json").read_text())
    assert meta["bbox"] == [[s.start, s.stop] for s in bbox]
    # Second pass reads the cache only: decoding NIfTI again would fail here.
    monkeypatch.setattr(cache, "load_case", lambda *a, **k: pytest.fail("NIfTI decoded again"))
    again, _ = cache.build_cache(find_cases(data)[:2], tmp_path / "cache")
    assert [c.folder for c in again] == [c.folder for c in good]
    assert cache.settings_key(MODALITIES) != cache.settings_key(("t1c",))


def test_split_fractions_and_stability(tmp_path):
    names = [f"case{i:03d}" for i in range(50)]
    split = make_split(names, seed=1)
    assert [len(split[k]) for k in ("train", "val", "test")] == [35, 5, 10]
    assert sorted(sum(split.values(), [])) == names
    assert make_split(list(reversed(names)), seed=1) == split      # listing order does not matter
    assert make_split(names, seed=2) != split
    small = make_split(["a", "b", "c"], seed=0)
    assert [len(small[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    with pytest.raises(ValueError, match="too few"):
        make_split(["a", "b"], seed=0, fractions=(0.0, 0.5, 0.5))

    path = tmp_path / "split.json"
    saved = load_or_create_split(path, names, seed=1)
    assert saved == split and path.is_file()
    # Reused even when asked with another seed; a case that disappeared is dropped, nothing moves.
    reused = load_or_create_split(path, names[:-1], seed=9)
    assert all(reused[k] == [n for n in split[k] if n != names[-1]] for k in split)
    with pytest.raises(ValueError, match="does not list 1 case"):
        load_or_create_split(path, names + ["new"], seed=1)


# ---------------------------------------------------------------- patches

def test_patch_dataset_deterministic_padded_and_foreground_biased(synth_root, tmp_path):
    good, _ = cache.build_cache(find_cases(synth_root), tmp_path / "cache")
    roi = (48, 16, 16)  # first side larger than the volume (33 voxels): must pad
    ds = PatchDataset(good, roi, samples_per_epoch=8, seed=0, pos_fraction=1.0)
    a = [ds[k] for k in range(8)]
    assert all(x["image"].shape == (4, *roi) and x["label"].shape == (1, *roi) for x in a)
    assert all(x["label"].dtype == torch.int64 and x["image"].dtype == torch.float32 for x in a)
    assert all(set(torch.unique(x["label"]).tolist()) <= {0, 1, 2, 3} for x in a)
    # pos_fraction=1: every crop is centred on tumour.
    assert all((x["label"] > 0).any() for x in a)
    b = PatchDataset(good, roi, 8, seed=0, pos_fraction=1.0)
    assert all(torch.equal(x["image"], b[k]["image"]) for k, x in enumerate(a))
    ds.set_epoch(1)
    assert not all(torch.equal(x["image"], ds[k]["image"]) for k, x in enumerate(a))


def test_epoch_schedule_and_rank_sampler():
    order = epoch_schedule(5, 12, seed=0, epoch=3)
    assert len(order) == 12 and sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert order == epoch_schedule(5, 12, 0, 3) and order != epoch_schedule(5, 12, 0, 4)
    # Two ranks with batch 2 together see each global batch of one rank with batch 4.
    r0, r1 = list(RankSampler(8, 2, 0, 2)), list(RankSampler(8, 2, 1, 2))
    assert r0 == [0, 1, 4, 5] and r1 == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="multiple of the global batch"):
        RankSampler(6, 2, 0, 2)
