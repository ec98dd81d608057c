"""Checkpoint files: written atomically, read as untrusted data.

A checkpoint is a dict of plain data and tensors only, so it loads with
``torch.load(weights_only=True)`` and a crafted file cannot run code:

    format_version  int
    model_config    dict accepted by segmamba.models.build_model(**model_config)
    model           state_dict
    train_config    dict: at least roi_size (list of 3 ints) and modalities (list of str); written by
                    the trainer also ``dataset``, the data set description
                    (segmamba.data.description.DatasetDescription.to_dict: channels and their
                    normalisation, labels, regions, target spacing, CT statistics), which is all
                    prediction needs besides the images; without it, BraTS with these modalities
    epoch           int, epochs completed
    optimizer, scheduler, rng, best_metric, ...   (trainer state, optional)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model_config", "model", "train_config")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a segmamba checkpoint."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing any code from it (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: file not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated files, disallowed globals
        raise CheckpointError(f"checkpoint: cannot load {path} as a weights-only checkpoint: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint: {path} holds a {type(state).__name__}, expected a segmamba checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint: {path} is not a segmamba checkpoint (missing keys {missing})")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: {path} has format_version {state['format_version']}, "
                              f"expected {FORMAT_VERSION}")
    return state
