"""Trainer state in checkpoints: RNG states as plain data, save and restore for --resume."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_checkpoint, save_checkpoint


def rng_state() -> dict[str, Any]:
    """torch, numpy and python RNG states as tensors/lists, loadable with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": list(internal), "gauss": gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, *, model: torch.nn.Module, model_config: dict, train_config: dict,
                        epoch: int, optimizer: torch.optim.Optimizer, scheduler: Any,
                        best_metric: float, best_epoch: int) -> Path:
    return save_checkpoint(path, {
        "model_config": model_config, "model": model.state_dict(), "train_config": train_config,
        "epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": rng_state(), "best_metric": best_metric, "best_epoch": best_epoch})


def restore_training_state(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any, device: torch.device) -> dict[str, Any]:
    """Load `path` into model/optimizer/scheduler and RNGs; returns the checkpoint dict."""
    ckpt = load_checkpoint(path, map_location=device)
    for key in ("optimizer", "scheduler", "rng", "epoch"):
        if key not in ckpt:
            raise ValueError(f"--resume: {path} has no '{key}' (not a trainer checkpoint); "
                             f"cannot continue training from it")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    return ckpt
