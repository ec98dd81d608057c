"""Dice and HD95 per scored structure (BraTS: WT, TC, ET; other data sets: their labels or
regions), computed with MONAI, with stated empty-mask rules.

Definitions
    Dice   2|P & R| / (|P| + |R|)                    (MONAI ``compute_dice``)
    HD95   in mm, from the surface voxels of each mask (mask XOR its 6-connected erosion) and the
           Euclidean distance (with the voxel spacing) from every surface voxel of one mask to the
           nearest surface voxel of the other, 95th percentile with linear interpolation:
      "monai"  (default) MONAI ``compute_hausdorff_distance(percentile=95)``: the percentile taken
               *per direction*, the larger of the two directions reported;
      "pooled" the percentile of both directions' distances together: the convention of medpy's
               ``hd95`` and of the public SegMamba metrics script, for comparison with the paper's
               HD95 (usually smaller than "monai": the shorter direction dilutes the other's tail).

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
from monai.metrics.utils import get_edge_surface_distance

from .data.description import Target
from .data.regions import BRATS_TARGETS, target_masks

METRICS: tuple[str, ...] = ("Dice", "HD95")
HD95_MODES: tuple[str, ...] = ("monai", "pooled")


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of an image of `shape` voxels of size `spacing` mm."""
    if len(shape) != len(spacing):
        raise ValueError(f"spacing: expected {len(shape)} values for shape {tuple(shape)}, got {tuple(spacing)}")
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))


def binary_scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], hd95: str = "monai") -> dict[str, float]:
    """Dice and HD95 (mm, `hd95` one of HD95_MODES) of two boolean masks of one structure, with the
    empty-mask conventions."""
    if hd95 not in HD95_MODES:
        raise ValueError(f"hd95: expected one of {HD95_MODES}, got {hd95!r}")
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
    mm = [float(s) for s in spacing]
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 warns about its own internal use of a deprecated argument on every call.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        if hd95 == "monai":
            distance = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=mm))
        else:
            _, both, _ = get_edge_surface_distance(p[0, 0], r[0, 0], spacing=mm, symmetric=True)
            distance = float(torch.quantile(torch.cat(both).double(), 0.95))
    return {"Dice": float(dice), "HD95": distance}


def region_scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                  targets: Sequence[Target] = BRATS_TARGETS, hd95: str = "monai") -> dict[str, dict[str, float]]:
    """{structure: {"Dice", "HD95"}} for label maps `pred` and `ref` of the same shape, per target
    (default BraTS's WT, TC, ET)."""
    if pred.shape != ref.shape:
        raise ValueError(f"pred: shape {pred.shape} differs from ref shape {ref.shape}")
    p, r = target_masks(pred, targets), target_masks(ref, targets)
    return {t.name: binary_scores(p[i], r[i], spacing, hd95) for i, t in enumerate(targets)}
