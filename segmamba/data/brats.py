"""BraTS2023 case discovery and loading, with every case checked before use.

Layout (as distributed): ``BraTS-GLI-XXXXX-YYY/BraTS-GLI-XXXXX-YYY-{t1c,t1n,t2f,t2w,seg}.nii.gz``.
Bad cases raise :class:`CaseError` naming the case and the file, so a data set can be
screened up front instead of crashing mid-epoch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

# Modality order of the public SegMamba BraTS2023 code.
MODALITIES: tuple[str, ...] = ("t2w", "t2f", "t1n", "t1c")
LABEL_SUFFIX = "seg"
VALID_LABELS = (0, 1, 2, 3)
_NIFTI_EXTS = (".nii.gz", ".nii")
# Voxel-to-world matrices written by different tools differ in float rounding.
_AFFINE_ATOL = 1e-3


class CaseError(ValueError):
    """A case is incomplete, inconsistent or unreadable; the message names the case and file."""


@dataclass
class Case:
    name: str
    image: np.ndarray            # float32 (C, X, Y, Z), channels in the requested modality order
    label: np.ndarray | None     # uint8 (X, Y, Z), values in {0, 1, 2, 3}
    affine: np.ndarray           # 4x4 voxel -> world (of the first modality)
    header: nib.Nifti1Header     # header of the first modality, to write outputs with its geometry
    spacing: tuple[float, float, float]


def find_cases(root: str | Path) -> list[Path]:
    """Sorted case folders under `root`: every sub-folder holding at least one NIfTI file."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root: not a directory: {root}")
    cases = [p for p in sorted(root.iterdir())
             if p.is_dir() and any(f.name.endswith(_NIFTI_EXTS) for f in p.iterdir())]
    if not cases:
        raise FileNotFoundError(f"data root: no case folders with NIfTI files in {root} "
                                f"(expected BraTS-GLI-XXXXX-YYY/BraTS-GLI-XXXXX-YYY-t1c.nii.gz ...)")
    return cases


def case_files(case_dir: str | Path, modalities: Sequence[str] = MODALITIES,
               with_label: bool = True) -> dict[str, Path]:
    """Paths of the case's modality files (and ``"seg"`` when `with_label`), in order.

    Raises CaseError when a file is missing.
    """
    case_dir = Path(case_dir)
    keys = list(modalities) + ([LABEL_SUFFIX] if with_label else [])
    files: dict[str, Path] = {}
    for key in keys:
        found = [case_dir / f"{case_dir.name}-{key}{ext}" for ext in _NIFTI_EXTS]
        found = [p for p in found if p.is_file()]
        if not found:
            raise CaseError(f"case {case_dir.name}: missing {key} file "
                            f"(expected {case_dir / f'{case_dir.name}-{key}.nii.gz'})")
        files[key] = found[0]
    return files


def _read(case: str, path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
        img.get_fdata(dtype=np.float32)  # decode now: a truncated gzip only fails on read
        return img
    except Exception as e:
        raise CaseError(f"case {case}: cannot read {path.name}: {type(e).__name__}: {e}") from e


def check_label(case: str, path: Path, label: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
        raise CaseError(f"case {case}: {path.name} holds non-integer label values")
    values = np.unique(label).astype(np.int64)
    if 4 in values:
        warnings.warn(f"case {case}: {path.name} uses label 4 for enhancing tumour (pre-2023 BraTS); "
                      f"mapped to 3", stacklevel=3)
        label = np.where(label == 4, 3, label)
        values = np.unique(label).astype(np.int64)
    bad = sorted(set(values.tolist()) - set(VALID_LABELS))
    if bad:
        raise CaseError(f"case {case}: {path.name} has labels {bad} outside {{0, 1, 2, 3}}")
    return label.astype(np.uint8)


def load_case(case_dir: str | Path, modalities: Sequence[str] = MODALITIES,
              with_label: bool = True) -> Case:
    """Read and check one case: all files present, same shape and affine, labels in {0,1,2,3}."""
    case_dir = Path(case_dir)
    name = case_dir.name
    if not modalities:
        raise ValueError("modalities: expected at least one modality name, got an empty list")
    files = case_files(case_dir, modalities, with_label)
    first_key = modalities[0]
    ref = _read(name, files[first_key])
    if len(ref.shape) != 3:
        raise CaseError(f"case {name}: {files[first_key].name} has shape {ref.shape}, expected a 3D volume")
    channels = []
    label = None
    for key, path in files.items():
        img = ref if key == first_key else _read(name, path)
        if img.shape != ref.shape:
            raise CaseError(f"case {name}: {path.name} has shape {img.shape}, "
                            f"expected {ref.shape} as in {files[first_key].name}")
        if not np.allclose(img.affine, ref.affine, atol=_AFFINE_ATOL):
            raise CaseError(f"case {name}: {path.name} has a different affine from {files[first_key].name}")
        data = img.get_fdata(dtype=np.float32)
        if key == LABEL_SUFFIX:
            label = check_label(name, path, data)
        else:
            if not np.all(np.isfinite(data)):
                raise CaseError(f"case {name}: {path.name} holds NaN or infinite values")
            channels.append(data)
    spacing = tuple(float(z) for z in ref.header.get_zooms()[:3])
    return Case(name=name, image=np.stack(channels).astype(np.float32, copy=False), label=label,
                affine=ref.affine.copy(), header=ref.header.copy(), spacing=spacing)
