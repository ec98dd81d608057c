"""What the embedded semi-synthetic tasks share: nilearn's MNI152 anatomy, random smooth
deformations and fields, the brain mask, atomic NIfTI writing and the progress bar.

The tumour task (:mod:`segmamba.data.synth`) and the tissue task
(:mod:`segmamba.data.synth_tissue`) draw from one ``numpy.random.Generator`` per case; the
functions here consume it in a fixed order, so a case depends only on (seed, case index).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
# Full width at half maximum of a Gaussian, in units of its sigma.
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass
class Anatomy:
    t1: np.ndarray   # template T1 in [0, 1]
    gm: np.ndarray   # probabilities in [0, 1]
    wm: np.ndarray
    affine: np.ndarray


def template_dir() -> Path:
    """Folder of nilearn's packaged MNI152 files (part of the wheel: no download)."""
    import nilearn
    path = Path(nilearn.__file__).parent / "datasets" / "data"
    if not (path / _TEMPLATE.format("t1")).is_file():
        raise FileNotFoundError(f"nilearn's MNI152 template is not in {path}; "
                                f"install a nilearn wheel that ships {_TEMPLATE.format('t1')}")
    return path


def load_anatomy(spacing: float = 1.0, antialias: bool = False) -> Anatomy:
    """The template and tissue maps, resampled to isotropic `spacing` mm (template is 1 mm).

    Without `antialias` a coarse voxel takes the value at its centre (linear interpolation).
    With it, the 1 mm maps are first blurred by a Gaussian whose FWHM widens the template's 1 mm
    to `spacing` mm, so a coarse voxel holds about the mean over its extent: tissue fractions
    (partial volume) as a scanner with that voxel size would see them, not point samples that
    alias thin structures such as the cortex and sulcal CSF.
    """
    if not spacing > 0:
        raise ValueError(f"spacing: expected a positive number of mm, got {spacing}")
    maps = {}
    affine = None
    for name in ("t1", "gm", "wm"):
        img = nib.load(str(template_dir() / _TEMPLATE.format(name)))
        data = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        if antialias and spacing > 1.0:
            data = ndimage.gaussian_filter(data, math.sqrt(spacing ** 2 - 1.0) / _FWHM_PER_SIGMA)
        if spacing != 1.0:
            data = ndimage.zoom(data, 1.0 / spacing, order=1, prefilter=False)
        maps[name] = np.clip(data, 0.0, 1.0)
        affine = img.affine.copy()
    affine[:3, :3] *= spacing
    return Anatomy(maps["t1"], maps["gm"], maps["wm"], affine)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cycles: float, waves: int = 8) -> np.ndarray:
    """Smooth random field in [-1, 1]: a sum of random plane waves of at most `cycles` periods
    across the volume (much cheaper than spline-upsampling a random grid)."""
    axes = [np.arange(s, dtype=np.float32) / s for s in shape]
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(waves):
        freq = rng.uniform(-cycles, cycles, size=3) * 2 * np.pi
        phase = rng.uniform(0, 2 * np.pi)
        arg = (freq[0] * axes[0])[:, None, None] + (freq[1] * axes[1])[None, :, None] + (freq[2] * axes[2])[None, None, :]
        field += rng.uniform(0.5, 1.0) * np.cos(arg + phase)
    return field / max(float(np.abs(field).max()), 1e-6)


def deform(rng: np.random.Generator, maps: list[np.ndarray], spacing: float) -> list[np.ndarray]:
    """Random affine (rotation <= 8 deg, scale 0.9..1.1) plus a smooth displacement (<= 4 mm),
    the same for every map in `maps` (linear interpolation, zero outside)."""
    shape = maps[0].shape
    centre = (np.array(shape) - 1) / 2.0
    angles = np.deg2rad(rng.uniform(-8, 8, size=3))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    matrix = rot @ np.diag(rng.uniform(0.9, 1.1, size=3))
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    coords = np.einsum("ij,j...->i...", matrix, grid - centre[:, None, None, None]) + centre[:, None, None, None]
    amplitude = 4.0 / spacing
    coords += np.stack([amplitude * smooth_noise(rng, shape, 2.0) for _ in range(3)]).astype(np.float32)
    return [ndimage.map_coordinates(m, coords, order=1, mode="constant", cval=0.0) for m in maps]


def brain_mask(t1: np.ndarray) -> np.ndarray:
    """The intracranial region of the (skull-stripped) template T1: signal, closed and filled."""
    return ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 0.05, iterations=2))


def bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(strength * noise), noise in [-1, 1] with at most one
    period across the volume, like an MRI receive-coil inhomogeneity."""
    return np.exp(strength * smooth_noise(rng, shape, 1.0))


def save_nifti(img: nib.Nifti1Image, path: Path) -> None:
    """Write with spatial units mm, then rename, so an interrupted run leaves no half-written
    file that looks complete."""
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def progress(cases: int, desc: str) -> Iterable[int]:
    """range(cases) with a progress bar on an interactive terminal (none in logs and tests)."""
    return tqdm(range(cases), desc=desc, unit="case", disable=None, leave=False)
