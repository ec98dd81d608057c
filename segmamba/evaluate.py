"""Score predicted segmentations against references: Dice and HD95 (mm) per case and region.

    python -m segmamba.evaluate --pred DIR --ref DIR [--csv scores.csv]

Predictions: ``PRED/<case>.nii.gz`` (as written by ``segmamba.predict``) or ``PRED/<case>-seg.nii.gz``.
References, any of: BraTS case folders ``REF/<case>/<case>-seg.nii.gz``, or flat files
``REF/<case>-seg.nii.gz`` / ``REF/<case>.nii.gz`` (``.nii`` also accepted). Every prediction is
scored; references without a prediction are ignored (e.g. scoring only the test split of a set).
Labels 0..3 (label 4, the pre-2023 enhancing tumour, is read as 3); regions WT = {1,2,3},
TC = {1,3}, ET = {3}. Voxel spacing comes from the reference header; prediction and reference
must have the same shape and affine.

Metrics and conventions (see ``segmamba.metrics``): Dice and MONAI's HD95 (95th percentile of the
surface distances in each direction, the larger of the two). Both masks empty -> Dice 1, HD95 0;
exactly one empty -> Dice 0, HD95 = the image diagonal in mm (373.13 mm for 240x240x155 at 1 mm,
the BraTS penalty: the largest distance possible in the image, so a missed or invented region is
never better than any real attempt, and means stay finite).

Output: per-case CSV (``--csv``, default PRED/scores.csv) and a summary table (mean, std,
median) on stdout. Unreadable or mismatched cases are listed at the end; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .data.brats import CaseError, check_label
from .data.regions import REGIONS
from .metrics import METRICS, region_scores

_EXTS = (".nii.gz", ".nii")
_SEG = "-seg"
# Affines written by different tools differ in float rounding (as in segmamba.data.brats).
_AFFINE_ATOL = 1e-3


def _stem(path: Path) -> str:
    for ext in _EXTS:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    raise ValueError(f"{path}: not a NIfTI file name (.nii or .nii.gz)")


def read_label(path: str | os.PathLike) -> tuple[np.ndarray, nib.Nifti1Image]:
    """uint8 label map (values 0..3) and its image; CaseError naming the file if unusable."""
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for truncated or foreign files
        raise CaseError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if data.ndim != 3:
        raise CaseError(f"{path}: has shape {data.shape}, expected a 3D label map")
    return check_label(str(path.parent), path, data), img


def find_predictions(pred_dir: Path) -> dict[str, Path]:
    """{case: file} for `<case>.nii.gz` or `<case>-seg.nii.gz` files in `pred_dir`."""
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"--pred: not a directory: {pred_dir}")
    found: dict[str, Path] = {}
    for f in sorted(pred_dir.iterdir()):
        if not (f.is_file() and f.name.endswith(_EXTS)) or f.name.startswith("."):
            continue
        stem = _stem(f)
        case = stem[: -len(_SEG)] if stem.endswith(_SEG) else stem
        if case in found:
            raise ValueError(f"--pred: two predictions for case {case}: {found[case].name} and {f.name}")
        found[case] = f
    if not found:
        raise FileNotFoundError(f"--pred: no .nii.gz / .nii files in {pred_dir}")
    return found


def find_reference(ref_dir: Path, case: str) -> Path:
    """The reference of `case` in any supported layout; CaseError listing the places looked at."""
    candidates = [ref_dir / case / f"{case}{_SEG}{ext}" for ext in _EXTS]
    candidates += [ref_dir / f"{case}{suffix}{ext}" for suffix in (_SEG, "") for ext in _EXTS]
    for c in candidates:
        if c.is_file():
            return c
    raise CaseError(f"case {case}: no reference in {ref_dir} (looked for {case}/{case}-seg.nii.gz, "
                    f"{case}-seg.nii.gz, {case}.nii.gz)")


def score_files(pred_path: Path, ref_path: Path) -> dict[str, dict[str, float]]:
    """Region scores of one prediction file against one reference file (same grid required)."""
    pred, pred_img = read_label(pred_path)
    ref, ref_img = read_label(ref_path)
    if pred.shape != ref.shape:
        raise CaseError(f"{pred_path}: shape {pred.shape} differs from the reference {ref_path} shape {ref.shape}")
    if not np.allclose(pred_img.affine, ref_img.affine, atol=_AFFINE_ATOL):
        raise CaseError(f"{pred_path}: affine differs from the reference {ref_path} "
                        f"(not on the same voxel grid)")
    spacing = [float(z) for z in ref_img.header.get_zooms()[:3]]
    return region_scores(pred, ref, spacing)


def columns() -> list[str]:
    return [f"{m}_{r}" for m in METRICS for r in REGIONS]


def summary(rows: list[dict[str, float]]) -> str:
    """Table of mean, std (population), median and n per metric and region."""
    lines = [f"{'':10s}{'mean':>10s}{'std':>10s}{'median':>10s}{'n':>6s}"]
    for col in columns():
        v = np.array([r[col] for r in rows], dtype=np.float64)
        lines.append(f"{col:10s}{v.mean():10.4f}{v.std():10.4f}{np.median(v):10.4f}{len(v):6d}")
    for m in METRICS:
        v = np.array([np.mean([r[f"{m}_{reg}"] for reg in REGIONS]) for r in rows])
        lines.append(f"{m + '_mean':10s}{v.mean():10.4f}{v.std():10.4f}{np.median(v):10.4f}{len(v):6d}")
    return "\n".join(lines)


def write_csv(path: Path, names: list[str], rows: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case"] + columns())
        for name, row in zip(names, rows):
            w.writerow([name] + [f"{row[c]:.6f}" for c in columns()])
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segmamba.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted <case>.nii.gz files")
    p.add_argument("--ref", required=True, type=Path, help="folder of references (BraTS case folders or flat files)")
    p.add_argument("--csv", type=Path, help="per-case CSV (default PRED/scores.csv)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preds = find_predictions(args.pred)
        if not args.ref.is_dir():
            raise FileNotFoundError(f"--ref: not a directory: {args.ref}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names, rows, failures = [], [], []
    for case, pred_path in tqdm(preds.items(), unit="case", desc="evaluate", disable=args.no_progress):
        try:
            scores = score_files(pred_path, find_reference(args.ref, case))
        except ValueError as e:  # CaseError included
            failures.append(f"{case}: {e}")
            continue
        names.append(case)
        rows.append({f"{m}_{r}": scores[r][m] for m in METRICS for r in REGIONS})
    csv_path = args.csv or args.pred / "scores.csv"
    if rows:
        write_csv(csv_path, names, rows)
        print(summary(rows))
        print(f"per-case scores: {csv_path}")
    if failures:
        print(f"{len(failures)} case(s) not scored:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
