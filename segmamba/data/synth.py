"""Semi-synthetic BraTS-like data from the MNI152 template that ships inside nilearn.

Each case: the template anatomy (T1 + grey/white-matter maps) under a random smooth deformation,
a glioma-like lesion (necrotic core 1, oedema 2, enhancing rim 3) of random size and place in the
brain, four contrasts derived from tissue classes (T1n; T1c with the rim bright; T2w with oedema and
fluid bright; T2-FLAIR with oedema bright and CSF dark), a smooth bias field and noise. Written in
the BraTS2023 layout so the same loader reads real and synthetic data.

    python -m segmamba.data.synth --out DIR --cases N [--seed S] [--spacing MM]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .brats import LABEL_SUFFIX, MODALITIES

_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
# Tissue classes in the order of the contrast table below.
_CLASSES = ("csf", "gm", "wm", "necrosis", "oedema", "enhancing")
# Relative signal per modality and class, ordered like real scans: fluid dark on T1 and FLAIR,
# bright on T2; the rim enhances only with contrast (T1c); oedema is brightest on FLAIR.
_CONTRAST = {
    "t1n": (0.25, 0.55, 0.80, 0.30, 0.45, 0.50),
    "t1c": (0.25, 0.55, 0.80, 0.30, 0.45, 1.00),
    "t2w": (1.00, 0.60, 0.40, 0.90, 0.80, 0.55),
    "t2f": (0.15, 0.60, 0.45, 0.40, 1.00, 0.70),
}


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


def load_anatomy(spacing: float = 1.0) -> Anatomy:
    """The template and tissue maps, resampled to isotropic `spacing` mm (template is 1 mm)."""
    if not spacing > 0:
        raise ValueError(f"spacing: expected a positive number of mm, got {spacing}")
    maps = {}
    affine = None
    for name in ("t1", "gm", "wm"):
        img = nib.load(str(template_dir() / _TEMPLATE.format(name)))
        data = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        if spacing != 1.0:
            data = ndimage.zoom(data, 1.0 / spacing, order=1, prefilter=False)
        maps[name] = np.clip(data, 0.0, 1.0)
        affine = img.affine.copy()
    affine[:3, :3] *= spacing
    return Anatomy(maps["t1"], maps["gm"], maps["wm"], affine)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cycles: float, waves: int = 8) -> np.ndarray:
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


def _deform(rng: np.random.Generator, maps: list[np.ndarray], spacing: float) -> list[np.ndarray]:
    """Random affine (rotation <= 8 deg, scale 0.9..1.1) plus a smooth displacement (<= 4 mm)."""
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
    coords += np.stack([amplitude * _smooth_noise(rng, shape, 2.0) for _ in range(3)]).astype(np.float32)
    return [ndimage.map_coordinates(m, coords, order=1, mode="constant", cval=0.0) for m in maps]


def _lesion(rng: np.random.Generator, brain: np.ndarray, wm: np.ndarray, spacing: float) -> np.ndarray:
    """Label map with a lobulated lesion: necrotic core 1 inside enhancing rim 3 inside oedema 2."""
    shape = brain.shape
    # Centre in deep brain (white matter, away from the edge) so most of the lesion is in the brain.
    inner = ndimage.binary_erosion(brain, iterations=max(1, int(round(15 / spacing)))) & (wm > 0.5)
    candidates = np.argwhere(inner if inner.any() else brain)
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    r_core = rng.uniform(10.0, 20.0) / spacing           # outer radius of the enhancing rim
    rim = rng.uniform(4.0, 8.0) / spacing
    r_oedema = r_core + rng.uniform(6.0, 18.0) / spacing
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    # Anisotropic, lobulated distance: stretch axes, then modulate the radius with smooth noise.
    stretch = rng.uniform(0.75, 1.3, size=3).astype(np.float32)
    dist = np.sqrt(sum(((grid[i] - centre[i]) / stretch[i]) ** 2 for i in range(3)))
    core_dist = dist / (1.0 + 0.25 * _smooth_noise(rng, shape, 2.0))
    oedema_dist = dist / (1.0 + 0.3 * _smooth_noise(rng, shape, 2.5))
    label = np.zeros(shape, dtype=np.uint8)
    label[oedema_dist < r_oedema] = 2
    label[core_dist < r_core] = 3
    label[core_dist < r_core - rim] = 1
    label[~brain] = 0
    return label


def synth_case(rng: np.random.Generator, anatomy: Anatomy, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """One case: (4, X, Y, Z) float32 image in MODALITIES order and (X, Y, Z) uint8 label."""
    t1, gm, wm = _deform(rng, [anatomy.t1, anatomy.gm, anatomy.wm], spacing)
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 0.05, iterations=2))
    label = _lesion(rng, brain, wm, spacing)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    tissue = [csf, gm, wm]
    # Partial volume at lesion borders: soft class maps blur over about one voxel.
    soft = [ndimage.gaussian_filter((label == k).astype(np.float32), 0.7) for k in (1, 2, 3)]
    healthy = np.clip(1.0 - sum(soft), 0.0, 1.0)
    fractions = [t * healthy for t in tissue] + soft
    bias = np.exp(0.15 * _smooth_noise(rng, brain.shape, 1.0))
    channels = {}
    for mod in MODALITIES:
        signal = sum(w * f for w, f in zip(_CONTRAST[mod], fractions))
        signal = signal * rng.uniform(0.9, 1.1) * bias
        signal = signal + rng.normal(0.0, 0.03, size=signal.shape)
        scale = rng.uniform(300.0, 1500.0)  # arbitrary scanner units, as in real data
        channels[mod] = np.where(brain, np.clip(signal, 0.01, None) * scale, 0.0).astype(np.float32)
    return np.stack([channels[m] for m in MODALITIES]), label


def case_name(index: int) -> str:
    return f"BraTS-GLI-{index:05d}-000"


def write_dataset(out: str | os.PathLike, cases: int, seed: int = 0, spacing: float = 1.0) -> list[Path]:
    """Write `cases` cases under `out` in the BraTS2023 layout. Case i depends only on (seed, i)."""
    if cases < 1:
        raise ValueError(f"cases: expected at least 1, got {cases}")
    out = Path(out)
    anatomy = load_anatomy(spacing)
    written = []
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        image, label = synth_case(rng, anatomy, spacing)
        name = case_name(i)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for mod, data in zip(MODALITIES, image):
            _save(nib.Nifti1Image(data, anatomy.affine), folder / f"{name}-{mod}.nii.gz")
        _save(nib.Nifti1Image(label, anatomy.affine), folder / f"{name}-{LABEL_SUFFIX}.nii.gz")
        written.append(folder)
    return written


def _save(img: nib.Nifti1Image, path: Path) -> None:
    # Write then rename so an interrupted run leaves no half-written case that looks complete.
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m segmamba.data.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--cases", type=int, required=True, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed -> same files (default 0)")
    p.add_argument("--spacing", type=float, default=1.0,
                   help="isotropic voxel size in mm; 1 = template resolution (197x233x189), "
                        "2 or 3 give small CPU-friendly volumes (default 1)")
    args = p.parse_args(argv)
    for folder in write_dataset(args.out, args.cases, args.seed, args.spacing):
        print(folder)


if __name__ == "__main__":
    main()
