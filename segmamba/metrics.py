"""Dice and HD95 per BraTS region (WT, TC, ET), computed with MONAI, with stated empty-mask rules.

Definitions
    Dice   2|P & R| / (|P| + |R|)                    (MONAI ``compute_dice``)
    HD95   MONAI ``compute_hausdorff_distance(percentile=95)`` in mm: the surface voxels of each
           mask (mask XOR its 6-connected erosion), the Euclidean distance (with the voxel spacing)
           from every surface voxel of one mask to the nearest surface voxel of the other, the 95th
           percentile (linear interpolation) taken *per direction*, and the larger of the two
           directions reported. (medpy and some challenge scripts pool both directions before
           taking the percentile, which gives a value <= ours.)

Empty masks (MONAI yields NaN/inf there, which would silently drop cases from a mean):
    both empty          Dice 1, HD95 0      the prediction is exactly right
    exactly one empty   Dice 0, HD95 = the image diagonal in mm, sqrt(sum((shape * spacing)^2))
                        (373.13 mm for 240x240x155 at 1 mm, the BraTS penalty). No two points in the
                        image are further apart, so a missed or invented region scores worse than any
                        non-empty prediction could, and the penalty stays finite, so means are defined.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from .data.regions import REGIONS, labels_to_regions

METRICS: tuple[str, ...] = ("Dice", "HD95")


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of an image of `shape` voxels of size `spacing` mm."""
    if len(shape) != len(spacing):
        raise ValueError(f"spacing: expected {len(shape)} values for shape {tuple(shape)}, got {tuple(spacing)}")
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))


def binary_scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice and HD95 (mm) of two boolean masks of one region, with the empty-mask conventions."""
    if pred.shape != ref.shape:
        raise ValueError(f"pred: shape {pred.shape} differs from ref shape {ref.shape}")
    if len(spacing) != pred.ndim or any(not s > 0 for s in spacing):
        raise ValueError(f"spacing: expected {pred.ndim} positive voxel sizes in mm, got {tuple(spacing)}")
    pred_empty, ref_empty = not pred.any(), not ref.any()
    if pred_empty and ref_empty:
        return {"Dice": 1.0, "HD95": 0.0}
    if pred_empty or ref_empty:
        return {"Dice": 0.0, "HD95": image_diagonal_mm(pred.shape, spacing)}
    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=bool))[None, None]
    r = torch.from_numpy(np.ascontiguousarray(ref, dtype=bool))[None, None]
    dice = compute_dice(p.float(), r.float(), include_background=True, ignore_empty=False)
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 warns about its own internal use of a deprecated argument on every call.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                          spacing=[float(s) for s in spacing])
    return {"Dice": float(dice), "HD95": float(hd95)}


def region_scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, dict[str, float]]:
    """{region: {"Dice", "HD95"}} for label maps (values 0..3) `pred` and `ref` of the same shape."""
    if pred.shape != ref.shape:
        raise ValueError(f"pred: shape {pred.shape} differs from ref shape {ref.shape}")
    p, r = labels_to_regions(pred), labels_to_regions(ref)
    return {name: binary_scores(p[i], r[i], spacing) for i, name in enumerate(REGIONS)}
