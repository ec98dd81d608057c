"""One training epoch: forward, loss, backward, clipping, optimiser and poly-LR steps."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from monai.losses import DiceCELoss

from .distributed import Dist


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stops and the last good checkpoint is kept."""


def make_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """'ce': cross-entropy over the 4 exclusive labels (public SegMamba code); 'dicece': + soft Dice."""
    if name == "ce":
        ce = torch.nn.CrossEntropyLoss()
        return lambda logits, label: ce(logits, label[:, 0])
    if name == "dicece":
        # Softmax over 4 exclusive labels, so DiceCELoss's softmax-CE is the right pairing here.
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)
    raise ValueError(f"--loss: expected 'ce' or 'dicece', got {name!r}")


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
