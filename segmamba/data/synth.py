"""Semi-synthetic BraTS-like data from the MNI152 template that ships inside nilearn.

Each case: the template anatomy (T1 + grey/white-matter maps) under a random smooth deformation,
a glioma-like lesion (necrotic core 1, oedema 2, enhancing rim 3) of random size and place in the
brain, four contrasts derived from tissue classes (T1n; T1c with the rim bright; T2w with oedema and
fluid bright; T2-FLAIR with oedema bright and CSF dark), a smooth bias field and noise. Written in
the BraTS2023 layout so the same loader reads real and synthetic data.

    python -m segmamba.data.synth --out DIR --cases N [--seed S] [--spacing MM]
    python -m segmamba.data.synth --task tissue --out DIR [--cases N] [--seed S] [--spacing MM]

The second is the brain-tissue task (CSF, grey and white matter from one T1-like channel, nnU-Net
v2 layout) of :mod:`segmamba.data.synth_tissue`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .brats import LABEL_SUFFIX, MODALITIES
from .synth_common import Anatomy, bias_field, brain_mask, deform, load_anatomy, progress, save_nifti, smooth_noise

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
    core_dist = dist / (1.0 + 0.25 * smooth_noise(rng, shape, 2.0))
    oedema_dist = dist / (1.0 + 0.3 * smooth_noise(rng, shape, 2.5))
    label = np.zeros(shape, dtype=np.uint8)
    label[oedema_dist < r_oedema] = 2
    label[core_dist < r_core] = 3
    label[core_dist < r_core - rim] = 1
    label[~brain] = 0
    return label


def synth_case(rng: np.random.Generator, anatomy: Anatomy, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """One case: (4, X, Y, Z) float32 image in MODALITIES order and (X, Y, Z) uint8 label."""
    t1, gm, wm = deform(rng, [anatomy.t1, anatomy.gm, anatomy.wm], spacing)
    brain = brain_mask(t1)
    label = _lesion(rng, brain, wm, spacing)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    tissue = [csf, gm, wm]
    # Partial volume at lesion borders: soft class maps blur over about one voxel.
    soft = [ndimage.gaussian_filter((label == k).astype(np.float32), 0.7) for k in (1, 2, 3)]
    healthy = np.clip(1.0 - sum(soft), 0.0, 1.0)
    fractions = [t * healthy for t in tissue] + soft
    bias = bias_field(rng, brain.shape, 0.15)
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
    for i in progress(cases, "tumour cases"):
        rng = np.random.default_rng([seed, i])
        image, label = synth_case(rng, anatomy, spacing)
        name = case_name(i)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for mod, data in zip(MODALITIES, image):
            save_nifti(nib.Nifti1Image(data, anatomy.affine), folder / f"{name}-{mod}.nii.gz")
        save_nifti(nib.Nifti1Image(label, anatomy.affine), folder / f"{name}-{LABEL_SUFFIX}.nii.gz")
        written.append(folder)
    return written


def main(argv: list[str] | None = None) -> None:
    from .synth_tissue import TISSUE_DEFAULTS, write_tissue_dataset

    p = argparse.ArgumentParser(prog="python -m segmamba.data.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["tumour", "tissue"], default="tumour",
                   help="tumour: BraTS-like glioma set, BraTS2023 layout (default); "
                        "tissue: CSF/GM/WM set, nnU-Net v2 layout")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--cases", type=int,
                   help=f"number of cases (required for tumour; tissue default {TISSUE_DEFAULTS['cases']})")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed -> same files (default 0)")
    p.add_argument("--spacing", type=float,
                   help="isotropic voxel size in mm; 1 = template resolution (197x233x189), 2 or 3 give "
                        f"small CPU-friendly volumes (default: tumour 1, tissue {TISSUE_DEFAULTS['spacing']})")
    args = p.parse_args(argv)
    if args.task == "tissue":
        write_tissue_dataset(Path(args.out), TISSUE_DEFAULTS["cases"] if args.cases is None else args.cases,
                             args.seed, TISSUE_DEFAULTS["spacing"] if args.spacing is None else args.spacing)
        print(args.out)
        return
    if args.cases is None:
        p.error("--cases is required for --task tumour")
    for folder in write_dataset(args.out, args.cases, args.seed, 1.0 if args.spacing is None else args.spacing):
        print(folder)


if __name__ == "__main__":
    main()
