"""Preprocess every case once and keep the result on disk, so epochs never re-decode NIfTI.

Cache layout: ``<cache_root>/<key>/<case>/{image,label}.npy`` + ``meta.json``, where ``key`` hashes
the settings that change the arrays (modalities, preprocessing version). ``.npy`` files are
memory-mapped on read, so a large data set does not have to fit in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .brats import MODALITIES, CaseError, load_case
from .preprocess import preprocess

# Bump when preprocessing changes so old caches are not reused.
PREPROCESS_VERSION = 1


@dataclass
class CachedCase:
    name: str
    folder: Path

    def image(self) -> np.ndarray:
        return np.load(self.folder / "image.npy", mmap_mode="r")

    def label(self) -> np.ndarray:
        return np.load(self.folder / "label.npy", mmap_mode="r")


def settings_key(modalities: Sequence[str]) -> str:
    settings = {"modalities": list(modalities), "preprocess": PREPROCESS_VERSION,
                "scheme": "crop-nonzero-bbox+zscore-nonzero"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def cache_case(case_dir: Path, folder: Path, modalities: Sequence[str]) -> CachedCase:
    """Load, check, preprocess and store one case (skipped if already cached)."""
    if not (folder / "meta.json").is_file():
        case = load_case(case_dir, modalities, with_label=True)
        image, bbox = preprocess(case.image)
        label = case.label[bbox]
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_save(folder / "image.npy", image)
        _atomic_save(folder / "label.npy", label)
        meta = {"name": case.name, "source": str(case_dir), "full_shape": list(case.label.shape),
                "bbox": [[s.start, s.stop] for s in bbox], "spacing": list(case.spacing)}
        tmp = folder / ".meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, folder / "meta.json")  # written last: its presence marks a complete entry
    return CachedCase(case_dir.name, folder)


def build_cache(case_dirs: Sequence[Path], cache_root: str | os.PathLike,
                modalities: Sequence[str] = MODALITIES, progress: bool = False
                ) -> tuple[list[CachedCase], dict[str, str]]:
    """Cache all cases. Returns (good cases, {bad case name: reason}); bad cases are skipped, not fatal."""
    root = Path(cache_root) / settings_key(modalities)
    good: list[CachedCase] = []
    bad: dict[str, str] = {}
    iterator = case_dirs
    if progress:
        from tqdm import tqdm
        iterator = tqdm(case_dirs, desc="preprocess", unit="case", dynamic_ncols=True)
    for case_dir in iterator:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                good.append(cache_case(Path(case_dir), root / Path(case_dir).name, modalities))
        except CaseError as e:
            bad[Path(case_dir).name] = str(e)
    return good, bad
