"""Whole-volume validation: Gaussian-weighted sliding windows, Dice per scored structure, reduced over ranks."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric

from ..data.description import DatasetDescription, brats_description
from ..data.regions import outputs_to_labels, target_masks
from .distributed import Dist
from .loop import autocast


@torch.no_grad()
def validate(model: torch.nn.Module, volumes, roi_size: Sequence[int], device: torch.device, d: Dist,
             *, amp: bool, sw_batch_size: int = 1, progress=None,
             description: DatasetDescription | None = None) -> dict[str, float]:
    """Mean Dice per scored structure (`description.evaluation`; default BraTS's WT, TC, ET) over the
    validation cases of all ranks (`volumes` is this rank's share), and their "mean".

    The outputs become labels as in prediction (argmax, or regions -> labels for region-based
    data sets), then structures. Empty-mask convention: reference and prediction both empty ->
    Dice 1 (ignore_empty=False), so cases without enhancing tumour count instead of becoming NaN.
    """
    desc = description or brats_description()
    targets = desc.evaluation
    model.eval()
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    sums = torch.zeros(len(targets), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for item in volumes:
        image = item["image"][None].to(device)
        with autocast(device, amp):
            logits = sliding_window_inference(image, roi_size=list(roi_size), sw_batch_size=sw_batch_size,
                                              predictor=model, overlap=0.5, mode="gaussian")
        pred = target_masks(outputs_to_labels(logits[0].float(), desc, logits=True), targets)[None].float()
        ref = target_masks(item["label"].to(device), targets)[None].float()
        sums += metric(pred, ref)[0].to("cpu", torch.float64)
        count += 1
        if progress is not None:
            progress.update(1)
    d.sum(sums)
    d.sum(count)
    if count == 0:
        raise ValueError("validation: no validation cases (the split's val list is empty)")
    dice = {t.name: float(s / count) for t, s in zip(targets, sums)}
    dice["mean"] = sum(dice[t.name] for t in targets) / len(targets)
    model.train()
    return dice
