"""Score predicted segmentations against references: Dice and HD95 (mm) per case and structure.

    python -m segmamba.evaluate --pred DIR --ref DIR [--data DATA] [--hd95 {monai,pooled}] [--csv scores.csv]

Predictions: ``PRED/<case>.nii.gz`` (as written by ``segmamba.predict``) or ``PRED/<case>-seg.nii.gz``.
References, any of: BraTS case folders ``REF/<case>/<case>-seg.nii.gz``, flat files
``REF/<case>-seg.nii.gz`` / ``REF/<case>.nii.gz`` (an nnU-Net or Decathlon ``labelsTr``; ``.nii``
also accepted), or a data set folder with a dataset.json (its ``labelsTr``). Every prediction is
scored; references without a prediction are ignored (e.g. scoring only the test split of a set).
Voxel spacing comes from the reference header; prediction and reference must have the same shape
and affine.

What is scored comes from the data set (``--data``; else the dataset.json in ``--ref`` or its
parent folder; else BraTS): BraTS's regions WT = {1,2,3}, TC = {1,3}, ET = {3} (label 4, the
pre-2023 enhancing tumour, read as 3); every foreground label of a label-based nnU-Net or
Decathlon set; every region of a region-based one; each named as in dataset.json.

Metrics and conventions (see ``segmamba.metrics``): Dice and HD95, by default MONAI's (95th
percentile of the surface distances in each direction, the larger of the two; ``--hd95 pooled``:
both directions pooled, as medpy and the public SegMamba metrics script compute it). Both masks
empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 = the image diagonal in mm (373.13 mm
for 240x240x155 at 1 mm, the BraTS penalty: the largest distance possible in the image, so a
missed or invented structure is never better than any real attempt, and means stay finite).

Output: per-case CSV (``--csv``, default PRED/scores.csv) and a summary table (mean, std,
median) on stdout. Unreadable or mismatched cases are listed at the end; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .data.description import DatasetDescription, Target, brats_description, read_dataset_json
from .data.loading import CaseError, check_label
from .metrics import HD95_MODES, METRICS, region_scores

_EXTS = (".nii.gz", ".nii")
_SEG = "-seg"
# Affines written by different tools differ in float rounding (as in segmamba.data.brats).
_AFFINE_ATOL = 1e-3


def _stem(path: Path) -> str:
    for ext in _EXTS:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    raise ValueError(f"{path}: not a NIfTI file name (.nii or .nii.gz)")


def read_label(path: str | os.PathLike, description: DatasetDescription | None = None
               ) -> tuple[np.ndarray, nib.Nifti1Image]:
    """uint8 label map (values in the description's set; default BraTS 0..3) and its image;
    CaseError naming the file if unusable."""
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for truncated or foreign files
        raise CaseError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if data.ndim != 3:
        raise CaseError(f"{path}: has shape {data.shape}, expected a 3D label map")
    return check_label(str(path.parent), path, data, description or brats_description()), img


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


def score_files(pred_path: Path, ref_path: Path, description: DatasetDescription | None = None,
                hd95: str = "monai") -> dict[str, dict[str, float]]:
    """Scores per structure of one prediction file against one reference file (same grid required)."""
    desc = description or brats_description()
    pred, pred_img = read_label(pred_path, desc)
    ref, ref_img = read_label(ref_path, desc)
    if pred.shape != ref.shape:
        raise CaseError(f"{pred_path}: shape {pred.shape} differs from the reference {ref_path} shape {ref.shape}")
    if not np.allclose(pred_img.affine, ref_img.affine, atol=_AFFINE_ATOL):
        raise CaseError(f"{pred_path}: affine differs from the reference {ref_path} "
                        f"(not on the same voxel grid)")
    spacing = [float(z) for z in ref_img.header.get_zooms()[:3]]
    return region_scores(pred, ref, spacing, desc.evaluation, hd95)


def _names(targets: Sequence[Target] | None) -> list[str]:
    return [t.name for t in (targets if targets is not None else brats_description().evaluation)]


def columns(targets: Sequence[Target] | None = None) -> list[str]:
    return [f"{m}_{r}" for m in METRICS for r in _names(targets)]


def summary(rows: list[dict[str, float]], targets: Sequence[Target] | None = None) -> str:
    """Table of mean, std (population), median and n per metric and structure."""
    names = _names(targets)
    width = max([10] + [len(c) + 2 for c in columns(targets)])
    lines = [f"{'':{width}s}{'mean':>10s}{'std':>10s}{'median':>10s}{'n':>6s}"]
    for col in columns(targets):
        v = np.array([r[col] for r in rows], dtype=np.float64)
        lines.append(f"{col:{width}s}{v.mean():10.4f}{v.std():10.4f}{np.median(v):10.4f}{len(v):6d}")
    for m in METRICS:
        v = np.array([np.mean([r[f"{m}_{name}"] for name in names]) for r in rows])
        lines.append(f"{m + '_mean':{width}s}{v.mean():10.4f}{v.std():10.4f}{np.median(v):10.4f}{len(v):6d}")
    return "\n".join(lines)


def write_csv(path: Path, names: list[str], rows: list[dict[str, float]],
              targets: Sequence[Target] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    cols = columns(targets)
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case"] + cols)
        for name, row in zip(names, rows):
            w.writerow([name] + [f"{row[c]:.6f}" for c in cols])
    os.replace(tmp, path)


def resolve_data(data: Path | None, ref: Path) -> tuple[DatasetDescription, Path]:
    """The description to score with and the folder of references.

    The description comes from `data` (any layout), else from a dataset.json in `ref` or its parent
    (a labelsTr folder), else it is BraTS's. A data set folder given as `ref` means its labelsTr.
    """
    holder = next((f for f in ([data] if data is not None else [ref, ref.parent])
                   if (f / "dataset.json").is_file()), None)
    if data is not None and not data.is_dir():
        raise FileNotFoundError(f"--data: not a directory: {data}")
    desc = read_dataset_json(holder)[0] if holder is not None else brats_description()
    ref_dir = ref / "labelsTr" if (ref / "dataset.json").is_file() else ref
    return desc, ref_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segmamba.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted <case>.nii.gz files")
    p.add_argument("--ref", required=True, type=Path,
                   help="folder of references: BraTS case folders, flat <case>.nii.gz files (labelsTr), or a "
                        "data set folder with a dataset.json")
    p.add_argument("--data", type=Path,
                   help="data set folder whose labels / regions are scored and named (default: the dataset.json "
                        "in --ref or its parent, else BraTS's WT, TC, ET)")
    p.add_argument("--hd95", choices=HD95_MODES, default="monai",
                   help="monai: 95th percentile per direction, the larger (default); pooled: of both directions' "
                        "surface distances together (medpy, the public SegMamba metrics script)")
    p.add_argument("--csv", type=Path, help="per-case CSV (default PRED/scores.csv)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preds = find_predictions(args.pred)
        if not args.ref.is_dir():
            raise FileNotFoundError(f"--ref: not a directory: {args.ref}")
        desc, ref_dir = resolve_data(args.data, args.ref)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    targets = desc.evaluation
    print(f"scoring {desc.name}: " + ", ".join(f"{t.name} {set(t.labels)}" for t in targets)
          + f"; HD95 {args.hd95}")
    names, rows, failures = [], [], []
    for case, pred_path in tqdm(preds.items(), unit="case", desc="evaluate", disable=args.no_progress):
        try:
            scores = score_files(pred_path, find_reference(ref_dir, case), desc, args.hd95)
        except ValueError as e:  # CaseError included
            failures.append(f"{case}: {e}")
            continue
        names.append(case)
        rows.append({f"{m}_{t.name}": scores[t.name][m] for m in METRICS for t in targets})
    csv_path = args.csv or args.pred / "scores.csv"
    if rows:
        write_csv(csv_path, names, rows, targets)
        print(summary(rows, targets))
        print(f"per-case scores: {csv_path}")
    if failures:
        print(f"{len(failures)} case(s) not scored:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
