"""Preprocess every case once and keep the result on disk, so epochs never re-decode NIfTI.

Cache layout: ``<cache_root>/<key>/<case>/{image,label}.npy`` + ``meta.json``, where ``key`` hashes
everything in the data set description that changes the arrays (channels and their order,
normalisation kinds and CT statistics, label values and aliases, target spacing, layout) and the
preprocessing version; ``meta.json`` records the source files' sizes and modification times, so a
replaced file is preprocessed again. ``.npy`` files are memory-mapped on read, so a large data set
does not have to fit in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .brats import MODALITIES, brats_source
from .description import DatasetDescription, brats_description
from .loading import CaseError, CaseSource, load_case, source_stamp
from .preprocess import preprocess_case

# Bump when preprocessing changes so old caches are not reused.
PREPROCESS_VERSION = 2
# Description fields that only name things: they do not change the arrays.
_NAMING_ONLY = ("name", "label_names", "evaluation", "regions", "regions_class_order")


@dataclass
class CachedCase:
    name: str
    folder: Path

    def image(self) -> np.ndarray:
        return np.load(self.folder / "image.npy", mmap_mode="r")

    def label(self) -> np.ndarray:
        return np.load(self.folder / "label.npy", mmap_mode="r")

    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / "meta.json").read_text())


def _description(description: DatasetDescription | Sequence[str]) -> DatasetDescription:
    # A list of names is the BraTS modalities (the form of the first, BraTS-only version).
    return description if isinstance(description, DatasetDescription) else brats_description(description)


def settings_key(description: DatasetDescription | Sequence[str]) -> str:
    d = _description(description).to_dict()
    for k in _NAMING_ONLY:
        d.pop(k)
    settings = {"description": d, "preprocess": PREPROCESS_VERSION,
                "scheme": "crop-nonzero-bbox+normalise-per-channel+resample"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _is_current(folder: Path, stamp: list) -> bool:
    try:
        return json.loads((folder / "meta.json").read_text()).get("source") == stamp
    except (OSError, json.JSONDecodeError):
        return False


def cache_case(src: CaseSource, folder: Path, desc: DatasetDescription) -> CachedCase:
    """Load, check, preprocess and store one case (skipped if cached from the same files)."""
    stamp = source_stamp(src)
    if not _is_current(folder, stamp):
        case = load_case(src, desc, with_label=True)
        image, label, geom = preprocess_case(case.image, case.spacing, desc, case.label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)  # an entry is complete only once meta.json is back
        _atomic_save(folder / "image.npy", image)
        _atomic_save(folder / "label.npy", label)
        meta = {"name": case.name, "source": stamp, **geom.to_dict()}
        tmp = folder / ".meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, folder / "meta.json")
    return CachedCase(src.name, folder)


def build_cache(cases: Sequence[CaseSource | Path], cache_root: str | os.PathLike,
                description: DatasetDescription | Sequence[str] = MODALITIES, progress: bool = False
                ) -> tuple[list[CachedCase], dict[str, str]]:
    """Cache all cases. Returns (good cases, {bad case name: reason}); bad cases are skipped, not fatal.

    `cases` are CaseSources, or BraTS case folders; `description` is the planned data set
    description (or, for BraTS folders, the list of modalities).
    """
    desc = _description(description)
    sources = [c if isinstance(c, CaseSource) else brats_source(c, desc.channel_names()) for c in cases]
    root = Path(cache_root) / settings_key(desc)
    good: list[CachedCase] = []
    bad: dict[str, str] = {}
    iterator: Sequence[CaseSource] = sources
    if progress:
        from tqdm import tqdm
        iterator = tqdm(sources, desc="preprocess", unit="case", dynamic_ncols=True)
    for src in iterator:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                good.append(cache_case(src, root / src.name, desc))
        except CaseError as e:
            bad[src.name] = str(e)
    return good, bad
