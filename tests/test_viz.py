"""segmamba.viz: slice centre, orientation, PNG size, CLI and its errors."""

from __future__ import annotations

import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmamba.viz import DPI, FIGSIZE, _to_ras, main, render_case, tumour_centre

PNG_SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def labels(shape=(20, 24, 16)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[4:12, 6:14, 3:9] = 2
    lab[6:10, 8:12, 4:8] = 3
    lab[7:9, 9:11, 5:7] = 1
    return lab


def test_tumour_centre_prefers_reference_then_largest_predicted_piece_then_volume_centre():
    shape = (20, 24, 16)
    pred, ref = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    pred[2:5, 10:12, 7:14] = 2   # 42 voxels, centre of mass (3, 10.5, 10)
    pred[15:17, 1:3, 1:3] = 1    # 8 voxels elsewhere: a false positive that must not move the centre
    ref[12:15, 3:6, 1:4] = 1     # centre of mass (13, 4, 2)
    assert tumour_centre(pred, ref) == (13, 4, 2)
    c = tumour_centre(pred, np.zeros(shape, np.uint8))
    assert c[0] == 3 and c[1] in (10, 11) and c[2] == 10
    assert tumour_centre(pred) == c
    assert tumour_centre(np.zeros(shape, np.uint8), None) == (10, 12, 8)


def test_to_ras_flips_and_permutes_axes():
    v = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_array_equal(_to_ras(v, lps), v[::-1, ::-1, :])
    swapped = np.array([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])  # voxel axis 0 is world y
    np.testing.assert_array_equal(_to_ras(v, swapped), v.transpose(1, 0, 2))


@pytest.mark.parametrize("with_ref", [False, True])
def test_render_case_writes_png_of_fixed_size(tmp_path, with_ref):
    rng = np.random.default_rng(0)
    lab = labels()
    flair = rng.uniform(1, 10, lab.shape).astype(np.float32)
    affine = np.diag([-1.2, 1.0, 2.5, 1.0])
    out = render_case(flair, affine, lab, np.roll(lab, 2, axis=0) if with_ref else None,
                      tmp_path / "sub" / "case.png", title="case")
    assert png_size(out) == PNG_SIZE


def test_render_case_empty_prediction_and_shape_mismatch(tmp_path):
    flair = np.ones((20, 24, 16), np.float32)
    assert png_size(render_case(flair, np.eye(4), np.zeros(flair.shape, np.uint8), None, tmp_path / "e.png")) == PNG_SIZE
    with pytest.raises(ValueError, match="pred: shape"):
        render_case(flair, np.eye(4), np.zeros((20, 24, 15), np.uint8), None, tmp_path / "x.png")


def test_cli(tmp_path, capsys):
    case = tmp_path / "BraTS-GLI-00001-000"
    case.mkdir()
    lab = labels()
    affine = np.diag([1.0, -1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.random.default_rng(1).uniform(1, 5, lab.shape).astype(np.float32), affine),
             str(case / f"{case.name}-t2f.nii.gz"))
    nib.save(nib.Nifti1Image(lab, affine), str(tmp_path / "pred.nii.gz"))
    nib.save(nib.Nifti1Image(lab[:, :, :-1], affine), str(tmp_path / "small.nii.gz"))
    out = tmp_path / "case.png"
    assert main(["--image", str(case), "--pred", str(tmp_path / "pred.nii.gz"),
                 "--ref", str(tmp_path / "pred.nii.gz"), "--out", str(out)]) == 0
    assert png_size(out) == PNG_SIZE
    assert main(["--image", str(case), "--pred", str(tmp_path / "small.nii.gz"), "--out", str(out)]) == 1
    assert "small.nii.gz: shape (20, 24, 15) differs" in capsys.readouterr().err
    assert main(["--image", str(tmp_path), "--pred", str(tmp_path / "pred.nii.gz"), "--out", str(out)]) == 1
    assert "missing t2f file" in capsys.readouterr().err
