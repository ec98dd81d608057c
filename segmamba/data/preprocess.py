"""Crop to the brain and z-score each modality over the brain (the nnU-Net/SegMamba scheme)."""

from __future__ import annotations

import numpy as np

BBox = tuple[slice, slice, slice]


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 4:
        raise ValueError(f"image: expected shape (C, X, Y, Z), got {image.shape}")


def foreground_bbox(image: np.ndarray) -> BBox:
    """Bounding box of the brain: voxels non-zero in any modality. Whole volume if all zero."""
    _check_image(image)
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def normalize_nonzero(image: np.ndarray) -> np.ndarray:
    """Per-modality z-score over that modality's non-zero voxels; zero voxels stay 0."""
    _check_image(image)
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        ch = image[c]
        mask = ch != 0
        if not mask.any():
            continue
        vals = ch[mask].astype(np.float64)
        std = vals.std()
        # A constant channel carries no contrast; centring it is all that is meaningful.
        out[c][mask] = (vals - vals.mean()) / (std if std > 0 else 1.0)
    return out


def preprocess(image: np.ndarray) -> tuple[np.ndarray, BBox]:
    """Crop to the brain's bounding box, then normalise. Returns the bbox to paste results back."""
    bbox = foreground_bbox(image)
    cropped = image[(slice(None),) + bbox]
    return normalize_nonzero(cropped), bbox
