"""Training patches and validation volumes from the preprocessed cache.

Randomness is a pure function of (seed, epoch, position in the epoch): every sample reseeds the
augmentation, so results do not depend on the number of workers or ranks, and a run resumed at an
epoch boundary draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset, Sampler

from .cache import CachedCase
from .transforms import train_transforms


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def epoch_schedule(n_cases: int, samples: int, seed: int, epoch: int) -> list[int]:
    """Case indices for one epoch: shuffled passes over all cases until `samples` are drawn."""
    if n_cases < 1:
        raise ValueError("n_cases: the training set is empty")
    g = torch.Generator().manual_seed(_seed(seed, epoch))
    order: list[int] = []
    while len(order) < samples:
        order += torch.randperm(n_cases, generator=g).tolist()
    return order[:samples]


class PatchDataset(Dataset):
    """Item `k` of epoch `e` = augmented crop of case schedule[k]; set the epoch before iterating."""

    def __init__(self, cases: Sequence[CachedCase], roi_size: Sequence[int], samples_per_epoch: int,
                 seed: int, pos_fraction: float = 0.5, elastic: bool = False):
        self.cases = list(cases)
        self.samples = samples_per_epoch
        self.seed = seed
        self.transform = train_transforms(roi_size, pos_fraction, elastic)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.schedule = epoch_schedule(len(self.cases), self.samples, self.seed, epoch)

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        case = self.cases[self.schedule[k]]
        self.transform.set_random_state(seed=_seed(self.seed, self.epoch, k, 1))
        # Copies: the cache is memory-mapped read-only and the transforms write in place.
        data = {"image": np.array(case.image(), dtype=np.float32),
                "label": np.array(case.label(), dtype=np.int64)[None]}
        with warnings.catch_warnings():
            # Data sets labelled everywhere inside the body (brain tissue) have no background voxel
            # with signal for the negative crops; MONAI then centres every crop on foreground, which
            # is right, but says so on every sample.
            warnings.filterwarnings("ignore", message="Num foregrounds .* Num backgrounds 0", category=UserWarning)
            out = self.transform(data)
        out = out[0] if isinstance(out, list) else out
        # Plain tensors: MONAI's MetaTensor metadata is not needed and slows collation.
        return {"image": convert_to_tensor(out["image"], dtype=torch.float32, track_meta=False).contiguous(),
                "label": convert_to_tensor(out["label"], dtype=torch.int64, track_meta=False).contiguous()}


class RankSampler(Sampler[int]):
    """Distributed sampler over consecutive global batches: rank r takes slice r of every global
    batch, so `world` ranks with batch B see exactly what one process with batch B*world sees."""

    def __init__(self, length: int, batch_size: int, rank: int = 0, world: int = 1):
        if length % (batch_size * world):
            raise ValueError(f"samples per epoch ({length}) must be a multiple of the global batch "
                             f"({batch_size} x {world} ranks)")
        self.length, self.batch, self.rank, self.world = length, batch_size, rank, world

    def __iter__(self):
        g = self.batch * self.world
        for start in range(0, self.length, g):
            yield from range(start + self.rank * self.batch, start + (self.rank + 1) * self.batch)

    def __len__(self) -> int:
        return self.length // self.world


class VolumeDataset(Dataset):
    """Whole preprocessed volumes for validation: image (C, X, Y, Z), label (X, Y, Z)."""

    def __init__(self, cases: Sequence[CachedCase]):
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        c = self.cases[i]
        return {"name": c.name, "image": torch.from_numpy(np.array(c.image(), dtype=np.float32)),
                "label": torch.from_numpy(np.array(c.label(), dtype=np.int64))}
