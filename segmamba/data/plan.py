"""The preprocessing plan of a data set, made from its training cases as nnU-Net v2 plans it.

* Target spacing: the median spacing per axis over the training cases, except on anisotropic data,
  where the low-resolution axis takes its 10th percentile (never finer than the other axes), so
  thin-slice cases do not force everything onto an interpolated fine grid.
* CT channels: intensity statistics (mean, std, 0.5th and 99.5th percentiles) of the training
  cases' foreground (label > 0), from up to FOREGROUND_SAMPLES voxels drawn per case.

The spacing comes from the headers only; CT statistics decode the training cases once and keep
their samples in the cache, so the plan of an unchanged data set costs nothing the second time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .description import DatasetDescription, IntensityStats
from .loading import CaseError, CaseSource, inspect_case, load_case, source_stamp

# nnU-Net v2, nnunetv2/configuration.py ANISO_THRESHOLD: an axis is the low-resolution one when its
# spacing is more than 3x that of the others.
ANISO_THRESHOLD = 3.0
# nnU-Net's collect_foreground_intensities draws 10,000 voxels per case by default (with
# replacement, so small foregrounds are not under-represented).
FOREGROUND_SAMPLES = 10_000
_SAMPLE_SEED = 1234
SPACING_CHOICES = ("median", "native")


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> tuple[float, float, float]:
    """Target spacing of a data set with these per-case spacings and shapes (voxels).

    The rule of nnU-Net v2's ExperimentPlanner.determine_fullres_target_spacing
    (nnunetv2/experiment_planning/experiment_planners/default_experiment_planner.py): the median
    per axis; but when the coarsest median axis is more than ANISO_THRESHOLD times coarser than the
    next coarsest and has fewer than 1/ANISO_THRESHOLD as many voxels as the smallest other axis,
    that axis takes the 10th percentile of its spacings, raised (plus 1e-5) to the coarsest other
    axis if it falls below it. (nnU-Net measures the shapes after cropping to the non-zero box; we
    use the header shapes, which needs no decoding and only matters when cropping changes which axis
    is short.)
    """
    sp = np.asarray(spacings, dtype=np.float64)
    sh = np.asarray(shapes, dtype=np.float64)
    if sp.ndim != 2 or sp.shape[1] != 3 or len(sp) == 0 or sh.shape != sp.shape:
        raise ValueError(f"spacings, shapes: expected equal (cases, 3) arrays, got {sp.shape} and {sh.shape}")
    target = np.percentile(sp, 50, axis=0)
    size = np.percentile(sh, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > ANISO_THRESHOLD * max(target[i] for i in others)
    aniso_voxels = size[worst] * ANISO_THRESHOLD < min(size[i] for i in others)
    if aniso_spacing and aniso_voxels:
        low = float(np.percentile(sp[:, worst], 10))
        coarsest_other = max(target[i] for i in others)
        if low < coarsest_other:
            low = max(coarsest_other, low) + 1e-5
        target[worst] = low
    return tuple(float(t) for t in target)  # type: ignore[return-value]


def foreground_samples(image: np.ndarray, label: np.ndarray, channels: Sequence[int],
                       n: int = FOREGROUND_SAMPLES, seed: int = _SAMPLE_SEED) -> np.ndarray:
    """(len(channels), n) intensities drawn with replacement from the voxels with label > 0
    (shape (len(channels), 0) when the case has no foreground)."""
    fg = label > 0
    if not fg.any():
        return np.zeros((len(channels), 0), np.float32)
    idx = np.random.default_rng(seed).integers(0, int(fg.sum()), size=n)
    return np.stack([image[c][fg][idx] for c in channels]).astype(np.float32)


def intensity_stats(samples: np.ndarray) -> IntensityStats:
    """Statistics of one channel's pooled foreground samples (nnU-Net's CTNormalization inputs)."""
    v = np.asarray(samples, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("CT normalisation: the training cases have no foreground voxels (label > 0) to "
                         "take intensity statistics from")
    low, high = np.percentile(v, (0.5, 99.5))
    return IntensityStats(mean=float(v.mean()), std=float(v.std()), low=float(low), high=float(high))


def _cached_samples(src: CaseSource, desc: DatasetDescription, channels: list[int], cache: Path | None) -> np.ndarray:
    key = hashlib.sha256(json.dumps({"files": source_stamp(src), "channels": channels, "n": FOREGROUND_SAMPLES,
                                     "layout": desc.layout, "aliases": desc.label_aliases,
                                     "seed": _SAMPLE_SEED}).encode()).hexdigest()[:16]
    path = None if cache is None else cache / "fingerprints" / f"{src.name}-{key}.npy"
    if path is not None and path.is_file():
        return np.load(path)
    case = load_case(src, desc, with_label=True)
    samples = foreground_samples(case.image, case.label, channels)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npy")
        np.save(tmp, samples)
        os.replace(tmp, path)
    return samples


def plan_dataset(desc: DatasetDescription, cases: Sequence[CaseSource], spacing: str | Sequence[float] = "median",
                 cache: str | os.PathLike | None = None, progress: bool = False
                 ) -> tuple[DatasetDescription, dict[str, str]]:
    """`desc` with the plan made from the training `cases`, and {bad case: reason} for cases that
    could not be used (they are left out of the plan; the caller skips them).

    `spacing`: "median" (nnU-Net's rule, :func:`target_spacing`), "native" (every case keeps its own
    spacing: no resampling) or three numbers in mm.
    """
    bad: dict[str, str] = {}
    headers = {}
    for src in cases:
        try:
            headers[src.name] = inspect_case(src, desc)
        except CaseError as e:
            bad[src.name] = str(e)
    if not headers:
        raise ValueError("plan: no usable training case to plan from")
    if isinstance(spacing, str):
        if spacing not in SPACING_CHOICES:
            raise ValueError(f"spacing: expected 'median', 'native' or 3 numbers of mm, got {spacing!r}")
        target = (None if spacing == "native" else
                  target_spacing([h.spacing for h in headers.values()], [h.shape for h in headers.values()]))
    else:
        target = tuple(float(s) for s in spacing)
        if len(target) != 3 or not all(s > 0 for s in target):
            raise ValueError(f"spacing: expected 3 positive numbers of mm, got {list(spacing)}")
    intensity: list[IntensityStats | None] = []
    if desc.needs_intensity_stats():
        ct = [i for i, c in enumerate(desc.channels) if c.norm == "ct"]
        root = None if cache is None else Path(cache)
        pooled = []
        good = [src for src in cases if src.name in headers]
        iterator = good
        if progress:
            from tqdm import tqdm
            iterator = tqdm(good, desc="CT intensity statistics", unit="case", dynamic_ncols=True)
        for src in iterator:
            try:
                pooled.append(_cached_samples(src, desc, ct, root))
            except CaseError as e:
                bad[src.name] = str(e)
        samples = np.concatenate(pooled, axis=1) if pooled else np.zeros((len(ct), 0), np.float32)
        stats = {c: intensity_stats(samples[j]) for j, c in enumerate(ct)}
        intensity = [stats.get(i) for i in range(len(desc.channels))]
    return desc.planned(target, intensity), bad
