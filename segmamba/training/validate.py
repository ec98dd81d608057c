"""Whole-volume validation: Gaussian-weighted sliding windows, Dice per region, reduced over ranks."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric

from ..data.regions import REGIONS, labels_to_regions
from .distributed import Dist
from .loop import autocast


@torch.no_grad()
def validate(model: torch.nn.Module, volumes, roi_size: Sequence[int], device: torch.device, d: Dist,
             *, amp: bool, sw_batch_size: int = 1, progress=None) -> dict[str, float]:
    """Mean Dice per region over the validation cases of all ranks (`volumes` is this rank's share).

    Empty-mask convention: reference and prediction both empty -> Dice 1 (ignore_empty=False),
    so cases without enhancing tumour count instead of becoming NaN.
    """
    model.eval()
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    sums = torch.zeros(len(REGIONS), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for item in volumes:
        image = item["image"][None].to(device)
        with autocast(device, amp):
            logits = sliding_window_inference(image, roi_size=list(roi_size), sw_batch_size=sw_batch_size,
                                              predictor=model, overlap=0.5, mode="gaussian")
        pred = labels_to_regions(logits.float().argmax(1)[0])[None].float()
        ref = labels_to_regions(item["label"].to(device))[None].float()
        sums += metric(pred, ref)[0].to("cpu", torch.float64)
        count += 1
        if progress is not None:
            progress.update(1)
    d.sum(sums)
    d.sum(count)
    if count == 0:
        raise ValueError("validation: no validation cases (the split's val list is empty)")
    dice = {r: float(s / count) for r, s in zip(REGIONS, sums)}
    dice["mean"] = sum(dice[r] for r in REGIONS) / len(REGIONS)
    model.train()
    return dice
