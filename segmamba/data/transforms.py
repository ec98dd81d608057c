"""On-the-fly augmentation with MONAI dictionary transforms (the SegMamba/nnU-Net list).

Keys: "image" (C, X, Y, Z) float32, "label" (1, X, Y, Z) integer labels 0..3.
Order: pad to the crop, foreground-biased crop, then spatial (rotation + scaling in one resampling,
optional elastic, flips on all axes), then intensity (brightness scale/shift, gamma).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from monai import transforms as mt

KEYS = ("image", "label")


def train_transforms(roi_size: Sequence[int], pos_fraction: float = 0.5, elastic: bool = False) -> mt.Compose:
    """Training augmentation. `pos_fraction`: chance that a crop is centred on tumour.

    Elastic deformation is off by default: on CPU it costs more than the rest of the pipeline
    together (a dense displacement field per sample).
    """
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction: expected a value in [0, 1], got {pos_fraction}")
    roi = [int(s) for s in roi_size]
    steps: list = [
        mt.SpatialPadd(keys=KEYS, spatial_size=roi, mode="constant"),
        mt.RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=roi,
                                  pos=pos_fraction, neg=1.0 - pos_fraction, num_samples=1,
                                  image_key="image", image_threshold=0.0, allow_smaller=False),
        mt.RandAffined(keys=KEYS, prob=0.2, rotate_range=[np.deg2rad(30)] * 3,
                       scale_range=[0.3] * 3, mode=("bilinear", "nearest"), padding_mode="zeros"),
    ]
    if elastic:
        steps.append(mt.Rand3DElasticd(keys=KEYS, sigma_range=(5, 8), magnitude_range=(50, 150),
                                       prob=0.2, mode=("bilinear", "nearest"), padding_mode="zeros"))
    steps += [
        mt.RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
        mt.RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
        mt.RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),
        mt.RandScaleIntensityd(keys="image", factors=0.25, prob=0.15),
        mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.15),
        mt.RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
    ]
    return mt.Compose(steps)
