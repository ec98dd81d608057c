"""BraTS2023 label map -> the three nested evaluation regions.

Labels: 1 necrotic core, 2 oedema, 3 enhancing tumour. WT = {1,2,3}, TC = {1,3}, ET = {3}.
(MONAI's ConvertToMultiChannelBasedOnBratsClasses assumes ET = 4 and yields an empty ET here.)
"""

from __future__ import annotations

import numpy as np
import torch

REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
REGION_LABELS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def labels_to_regions(label: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """(...) integer label map -> (3, ...) bool masks in the order WT, TC, ET (numpy or torch)."""
    if isinstance(label, torch.Tensor):
        if label.is_floating_point():
            label = label.round().long()
        return torch.stack([torch.isin(label, torch.tensor(REGION_LABELS[r], device=label.device))
                            for r in REGIONS])
    label = np.asarray(label)
    if np.issubdtype(label.dtype, np.floating):
        label = np.rint(label).astype(np.int64)
    return np.stack([np.isin(label, REGION_LABELS[r]) for r in REGIONS])
