"""One training epoch: forward, loss, backward, clipping, optimiser and poly-LR steps."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import torch
from monai.losses import DiceCELoss, DiceLoss

from ..data.description import Target
from .distributed import Dist


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stops and the last good checkpoint is kept."""


def make_loss(name: str, regions: Sequence[Target] = ()) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss on (B, K, ...) logits and (B, 1, ...) integer labels.

    Without `regions`: softmax over exclusive labels. 'ce': cross-entropy (public SegMamba code);
    'dicece': + soft Dice. With `regions` (region-based data sets, nnU-Net's scheme): one sigmoid
    per region. 'ce': binary cross-entropy per region; 'dicece': + soft Dice per region.
    """
    if name not in ("ce", "dicece"):
        raise ValueError(f"--loss: expected 'ce' or 'dicece', got {name!r}")
    if regions:
        return RegionLoss(regions, dice=name == "dicece")
    if name == "ce":
        ce = torch.nn.CrossEntropyLoss()
        return lambda logits, label: ce(logits, label[:, 0])
    # Softmax over exclusive labels, so DiceCELoss's softmax-CE is the right pairing here.
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)


class RegionLoss(torch.nn.Module):
    """Binary cross-entropy (+ soft Dice) of one sigmoid output per region against its mask.

    Built from BCEWithLogitsLoss and DiceLoss(sigmoid=True), not DiceCELoss: with more than one
    channel DiceCELoss takes a softmax cross-entropy even when sigmoid=True, which is wrong for
    overlapping regions (WT contains TC contains ET).
    """

    def __init__(self, regions: Sequence[Target], dice: bool):
        super().__init__()
        size = max(v for r in regions for v in r.labels) + 1
        lut = torch.zeros(size, len(regions))
        for j, r in enumerate(regions):
            lut[list(r.labels), j] = 1.0
        self.register_buffer("lut", lut, persistent=False)  # label value -> region memberships
        self.bce = torch.nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(sigmoid=True, include_background=True) if dice else None

    def targets(self, label: torch.Tensor) -> torch.Tensor:
        """(B, 1, ...) labels -> (B, R, ...) float region masks (labels outside every region: 0)."""
        lab = label[:, 0].long()
        lut = self.lut.to(lab.device)
        inside = lab < lut.shape[0]
        masks = lut[torch.where(inside, lab, 0)] * inside[..., None]
        return masks.movedim(-1, 1)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        target = self.targets(label)
        loss = self.bce(logits, target)
        return loss + self.dice(logits, target) if self.dice is not None else loss


def poly_lambda(total_steps: int, power: float = 0.9) -> Callable[[int], float]:
    total = max(1, total_steps)
    return lambda step: max(0.0, 1.0 - min(step, total) / total) ** power


def autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_epoch(model: torch.nn.Module, batches: Iterable[dict], loss_fn, optimizer: torch.optim.Optimizer,
                scheduler, device: torch.device, d: Dist, *, amp: bool, clip: float, epoch: int,
                progress=None) -> float:
    """Run one epoch; returns the mean (over iterations) of the loss averaged over all ranks."""
    model.train()
    total = torch.zeros((), dtype=torch.float64)
    n = 0
    for it, batch in enumerate(batches):
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(image)
        loss = loss_fn(logits.float(), label)
        # Reduced before backward so every rank sees the same verdict and stops together.
        global_loss = d.sum(loss.detach().to("cpu", torch.float64).clone()) / d.world
        if not torch.isfinite(global_loss):
            raise NonFiniteLossError(f"loss is {global_loss.item()} at epoch {epoch + 1}, iteration {it + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        total += global_loss
        n += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{global_loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return float(total / max(n, 1))
