"""Deterministic train/val/test split (70/10/20 by default), saved to JSON and reused."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Sequence

SPLITS = ("train", "val", "test")


def make_split(names: Sequence[str], seed: int = 0,
               fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> dict[str, list[str]]:
    """Shuffle the *sorted* names with `seed` and cut; independent of directory listing order.

    With at least 3 cases, val and test each get at least one case.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions: expected 3 non-negative numbers summing to 1, got {fractions}")
    if len(set(names)) != len(names):
        raise ValueError("names: case names must be unique")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val, n_test = round(fractions[1] * n), round(fractions[2] * n)
    if n >= 3:
        n_val, n_test = max(n_val, 1 if fractions[1] > 0 else 0), max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"names: {n} case(s) is too few for a split with a non-empty training set")
    return {"train": sorted(order[:n_train]), "val": sorted(order[n_train:n_train + n_val]),
            "test": sorted(order[n_train + n_val:])}


def load_or_create_split(path: str | os.PathLike, names: Sequence[str], seed: int = 0) -> dict[str, list[str]]:
    """Reuse the split in `path` if present (so runs are comparable), else create and save it.

    Cases listed in the file but now missing (e.g. screened out as broken) are dropped with no
    reshuffle; cases not in the file are an error, because silently adding them changes the split.
    """
    path = Path(path)
    if path.is_file():
        split = json.loads(path.read_text())
        if not isinstance(split, dict) or any(k not in split for k in SPLITS):
            raise ValueError(f"split file {path}: expected a JSON object with keys {list(SPLITS)}")
        listed = {n for k in SPLITS for n in split[k]}
        new = sorted(set(names) - listed)
        if new:
            raise ValueError(f"split file {path} does not list {len(new)} case(s) of the data set "
                             f"(e.g. {new[:3]}); delete it or pass another --split file to re-split")
        present = set(names)
        return {k: [n for n in split[k] if n in present] for k in SPLITS}
    split = make_split(names, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"seed": seed, **split}, indent=1))
    os.replace(tmp, path)
    return split
