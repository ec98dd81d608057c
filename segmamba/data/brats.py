"""The BraTS2023 folder layout: one folder per case, one file per modality plus the segmentation.

Layout (as distributed): ``BraTS-GLI-XXXXX-YYY/BraTS-GLI-XXXXX-YYY-{t1c,t1n,t2f,t2w,seg}.nii.gz``.
What BraTS *is* (channels, labels, regions) is :func:`segmamba.data.description.brats_description`;
reading and checking a case is :mod:`segmamba.data.loading`, shared by every layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .description import BRATS_MODALITIES, FILE_ENDINGS, brats_description
from .loading import Case, CaseError, CaseSource
from .loading import check_label as _check_label
from .loading import load_case as _load_case

__all__ = ["MODALITIES", "LABEL_SUFFIX", "Case", "CaseError", "find_cases", "case_files", "brats_source",
           "check_label", "load_case"]

MODALITIES: tuple[str, ...] = BRATS_MODALITIES
LABEL_SUFFIX = "seg"


def find_cases(root: str | Path) -> list[Path]:
    """Sorted case folders under `root`: every sub-folder holding at least one NIfTI file."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root: not a directory: {root}")
    cases = [p for p in sorted(root.iterdir())
             if p.is_dir() and any(f.name.endswith(FILE_ENDINGS) for f in p.iterdir())]
    if not cases:
        raise FileNotFoundError(f"data root: no case folders with NIfTI files in {root} "
                                f"(expected BraTS-GLI-XXXXX-YYY/BraTS-GLI-XXXXX-YYY-t1c.nii.gz ..., or an "
                                f"nnU-Net / Decathlon folder with a dataset.json)")
    return cases


def _file(case_dir: Path, key: str) -> Path:
    """``<case>-<key>.nii.gz``, or ``.nii`` when only that exists."""
    found = [case_dir / f"{case_dir.name}-{key}{ext}" for ext in FILE_ENDINGS]
    return next((p for p in found if p.is_file()), found[0])


def brats_source(case_dir: str | Path, modalities: Sequence[str] = MODALITIES, with_label: bool = True) -> CaseSource:
    """The files of one BraTS case folder (they are checked when the case is read)."""
    case_dir = Path(case_dir)
    return CaseSource(case_dir.name, tuple(_file(case_dir, m) for m in modalities),
                      _file(case_dir, LABEL_SUFFIX) if with_label else None)


def case_files(case_dir: str | Path, modalities: Sequence[str] = MODALITIES,
               with_label: bool = True) -> dict[str, Path]:
    """Paths of the case's modality files (and ``"seg"`` when `with_label`), in order.

    Raises CaseError when a file is missing.
    """
    case_dir = Path(case_dir)
    keys = list(modalities) + ([LABEL_SUFFIX] if with_label else [])
    files = {key: _file(case_dir, key) for key in keys}
    for key, path in files.items():
        if not path.is_file():
            raise CaseError(f"case {case_dir.name}: missing {key} file (expected {path})")
    return files


def check_label(case: str, path: Path, label: np.ndarray) -> np.ndarray:
    """BraTS labels {0, 1, 2, 3} as uint8 (4, the pre-2023 enhancing tumour, read as 3 with a warning)."""
    return _check_label(case, path, label, brats_description())


def load_case(case_dir: str | Path, modalities: Sequence[str] = MODALITIES, with_label: bool = True) -> Case:
    """Read and check one case folder: all files present, same shape and affine, labels in {0,1,2,3}."""
    desc = brats_description(modalities)
    return _load_case(brats_source(case_dir, modalities, with_label), desc, with_label)
