"""Label maps <-> the structures a data set is trained and scored on.

A structure (:class:`segmamba.data.description.Target`) is a set of label values: a single label, or
a region such as BraTS's WT = {1, 2, 3}, TC = {1, 3}, ET = {3}. (MONAI's
ConvertToMultiChannelBasedOnBratsClasses assumes ET = 4 and yields an empty ET on BraTS2023.)
Network outputs become labels by :func:`outputs_to_labels`: argmax over softmax outputs, or, for a
region-based data set, nnU-Net's rule: start from background and, for each region in order, write
its ``regions_class_order`` label wherever the region is predicted (later regions win).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .description import BRATS_REGIONS, DatasetDescription, Target

REGIONS: tuple[str, ...] = tuple(BRATS_REGIONS)
BRATS_TARGETS: tuple[Target, ...] = tuple(Target(n, v) for n, v in BRATS_REGIONS.items())


def target_masks(label: np.ndarray | torch.Tensor, targets: Sequence[Target]) -> np.ndarray | torch.Tensor:
    """(...) integer label map -> (len(targets), ...) bool masks (numpy or torch)."""
    if isinstance(label, torch.Tensor):
        if label.is_floating_point():
            label = label.round().long()
        return torch.stack([torch.isin(label, torch.tensor(t.labels, device=label.device)) for t in targets])
    label = np.asarray(label)
    if np.issubdtype(label.dtype, np.floating):
        label = np.rint(label).astype(np.int64)
    return np.stack([np.isin(label, t.labels) for t in targets])


def labels_to_regions(label: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """(...) BraTS label map -> (3, ...) bool masks in the order WT, TC, ET (numpy or torch)."""
    return target_masks(label, BRATS_TARGETS)


def regions_to_labels(masks: torch.Tensor, class_order: Sequence[int]) -> torch.Tensor:
    """(R, ...) bool region masks -> (...) uint8 labels, region i writing class_order[i] (later wins)."""
    if masks.shape[0] != len(class_order):
        raise ValueError(f"masks: expected {len(class_order)} regions (one per regions_class_order entry), "
                         f"got {masks.shape[0]}")
    out = torch.zeros(masks.shape[1:], dtype=torch.uint8, device=masks.device)
    for m, value in zip(masks, class_order):
        out[m] = value
    return out


def outputs_to_labels(outputs: torch.Tensor, desc: DatasetDescription, *, logits: bool) -> torch.Tensor:
    """(K, ...) network outputs (logits, or probabilities when not `logits`) -> (...) uint8 labels."""
    if outputs.shape[0] != desc.out_channels:
        raise ValueError(f"model: expected {desc.out_channels} output channels ({desc.outputs}), "
                         f"got {outputs.shape[0]}")
    if not desc.region_based:
        return outputs.argmax(0).to(torch.uint8)  # output channel k is label k
    return regions_to_labels(outputs > (0.0 if logits else 0.5), desc.regions_class_order)
