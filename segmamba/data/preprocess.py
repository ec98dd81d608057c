"""From a case's voxels to the network's grid and back (the nnU-Net scheme).

Order, as in nnU-Net's DefaultPreprocessor: crop to the non-zero box of all channels, normalise each
channel by its kind (:data:`segmamba.data.description.NORMALISATIONS`), resample to the target
spacing. :func:`restore` maps the network's outputs back onto the cropped grid; the caller pastes
them into the full volume. BraTS (every case already at the target spacing) is crop + z-score over
the brain, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.transforms import Resize

from .description import Channel, DatasetDescription, IntensityStats

BBox = tuple[slice, slice, slice]
# nnU-Net v2 get_do_separate_z (nnunetv2/preprocessing/resampling/default_resampling.py): when one
# axis is more than 3x coarser than the finest, it is resampled separately with nearest neighbour
# (order_z = 0): values are never interpolated across its thick slices.
SEPARATE_AXIS_THRESHOLD = 3.0


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


def _zscore_nonzero(ch: np.ndarray, out: np.ndarray) -> None:
    mask = ch != 0
    if not mask.any():
        return
    vals = ch[mask].astype(np.float64)
    std = vals.std()
    # A constant channel carries no contrast; centring it is all that is meaningful.
    out[mask] = (vals - vals.mean()) / (std if std > 0 else 1.0)


def normalize_nonzero(image: np.ndarray) -> np.ndarray:
    """Per-modality z-score over that modality's non-zero voxels; zero voxels stay 0."""
    _check_image(image)
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        _zscore_nonzero(image[c], out[c])
    return out


def normalize(image: np.ndarray, channels: Sequence[Channel], intensity: Sequence[IntensityStats | None] = ()
              ) -> np.ndarray:
    """Each channel by its kind: "zscore" over its non-zero voxels (zeros stay 0: the outside of the
    brain in BraTS); "ct" clipped to the training foreground's [0.5, 99.5] percentiles, then
    (x - mean) / std of that foreground; "rescale" to [0, 1]; "none" unchanged."""
    _check_image(image)
    if image.shape[0] != len(channels):
        raise ValueError(f"image: expected {len(channels)} channels ({[c.name for c in channels]}), "
                         f"got {image.shape[0]}")
    out = np.zeros(image.shape, dtype=np.float32)
    for c, ch in enumerate(channels):
        if ch.norm == "zscore":
            _zscore_nonzero(image[c], out[c])
        elif ch.norm == "ct":
            stats = intensity[c] if c < len(intensity) else None
            if stats is None:
                raise ValueError(f"channel {ch.name!r}: CT normalisation needs the training set's intensity "
                                 f"statistics (plan the data set first)")
            out[c] = (np.clip(image[c], stats.low, stats.high) - stats.mean) / max(stats.std, 1e-8)
        elif ch.norm == "rescale":
            lo, hi = float(image[c].min()), float(image[c].max())
            out[c] = (image[c] - lo) / max(hi - lo, 1e-8)
        else:
            out[c] = image[c]
    return out


def preprocess(image: np.ndarray) -> tuple[np.ndarray, BBox]:
    """Crop to the brain's bounding box, then normalise. Returns the bbox to paste results back."""
    bbox = foreground_bbox(image)
    cropped = image[(slice(None),) + bbox]
    return normalize_nonzero(cropped), bbox


# ---------------------------------------------------------------------- resampling

def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None) -> tuple[int, ...]:
    """nnU-Net's compute_new_shape: round(shape * spacing / target) per axis (the shape itself if no target)."""
    if target is None:
        return tuple(int(s) for s in shape)
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def separate_axis(spacing: Sequence[float], target: Sequence[float]) -> int | None:
    """The axis resampled on its own with nearest neighbour, if the current spacing (else the
    target) is anisotropic with one coarsest axis (nnU-Net's get_do_separate_z / get_lowres_axis)."""
    for s in (spacing, target):
        s = np.asarray(s, dtype=np.float64)
        if s.max() / s.min() > SEPARATE_AXIS_THRESHOLD:
            coarsest = np.flatnonzero(s == s.max())
            return int(coarsest[0]) if len(coarsest) == 1 else None
    return None


def resample(array: np.ndarray | torch.Tensor, shape: Sequence[int], axis: int | None = None, *,
             label: bool = False) -> torch.Tensor:
    """(C, X, Y, Z) array resized to `shape` with MONAI's Resize (voxel centres mapped as nnU-Net's
    resize does): trilinear for intensities, nearest for label maps; with `axis`, that axis is
    resized afterwards with nearest neighbour only."""
    data = torch.as_tensor(array).float()  # label values <= 255 are exact in float32
    mode = "nearest-exact" if label else "trilinear"
    shape = [int(s) for s in shape]
    if axis is not None:
        in_plane = list(shape)
        in_plane[axis] = data.shape[1 + axis]
        data = Resize(in_plane, mode=mode)(data)
        mode = "nearest-exact"
    out = Resize(shape, mode=mode)(data)
    return out.as_tensor() if hasattr(out, "as_tensor") else out


@dataclass(frozen=True)
class Geometry:
    """Where a case's network-grid arrays came from: enough to put outputs back on its grid."""
    full_shape: tuple[int, int, int]
    bbox: BBox
    spacing: tuple[float, float, float]
    net_shape: tuple[int, int, int]
    axis: int | None   # resampled separately (anisotropic), see separate_axis

    @property
    def cropped_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.bbox)

    def to_dict(self) -> dict:
        return {"full_shape": list(self.full_shape), "bbox": [[s.start, s.stop] for s in self.bbox],
                "spacing": list(self.spacing), "net_shape": list(self.net_shape), "axis": self.axis}


def preprocess_case(image: np.ndarray, spacing: Sequence[float], desc: DatasetDescription,
                    label: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Crop, normalise and resample one case as `desc` plans it: (image, label or None, geometry)."""
    bbox = foreground_bbox(image)
    cropped = image[(slice(None),) + bbox]
    normed = normalize(cropped, desc.channels, desc.intensity)
    shape = resampled_shape(cropped.shape[1:], spacing, desc.spacing)
    axis = None if desc.spacing is None else separate_axis(spacing, desc.spacing)
    lab = None if label is None else label[bbox]
    if shape != cropped.shape[1:]:
        normed = resample(normed, shape, axis).numpy()
        if lab is not None:
            lab = resample(lab[None], shape, axis, label=True)[0].numpy().astype(np.uint8)
    geom = Geometry(tuple(image.shape[1:]), bbox, tuple(float(s) for s in spacing), shape, axis)  # type: ignore[arg-type]
    return normed, lab, geom


def restore(outputs: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """(K, *net_shape) probabilities back onto the cropped grid (K, *cropped_shape): linear, and
    nearest along a separately resampled axis (nnU-Net's export of probabilities)."""
    if tuple(outputs.shape[1:]) != tuple(geom.net_shape):
        raise ValueError(f"outputs: expected spatial shape {geom.net_shape}, got {tuple(outputs.shape[1:])}")
    if tuple(geom.net_shape) == geom.cropped_shape:
        return outputs
    return resample(outputs, geom.cropped_shape, geom.axis)
