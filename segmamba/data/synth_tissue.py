"""Embedded brain-tissue task: CSF / grey matter / white matter from one T1-like channel.

Each case is nilearn's MNI152 template (T1 and grey/white-matter probability maps, resampled
with anti-aliasing so voxels hold tissue fractions) under a random smooth deformation. Labels
(background 0, CSF 1, GM 2, WM 3): inside the brain mask, each voxel takes the tissue with the
largest fraction among CSF = 1 - GM - WM, GM and WM (ties go to the lower label); outside it,
background. So CSF is the brain mask minus the GM and WM masks. The image mixes per-tissue T1
intensities by those fractions (partial volume), with per-case random contrast (WM bright, GM
mid, CSF dark, the gaps varying), a smooth bias field, noise and an arbitrary scanner scale: no
global threshold separates the classes. Written in the nnU-Net v2 raw layout:

    OUT/dataset.json
    OUT/imagesTr/tissue_000_0000.nii.gz ...   (channel 0000 = T1)
    OUT/labelsTr/tissue_000.nii.gz ...

    python -m segmamba.data.synth --task tissue --out DIR [--cases N] [--spacing MM] [--seed S]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .synth_common import Anatomy, bias_field, brain_mask, deform, load_anatomy, progress, save_nifti

LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
CHANNEL_NAMES = {"0": "T1"}
FILE_ENDING = ".nii.gz"
# 2.5 mm: the cortex (2-4 mm thick) and sulcal CSF stay about a voxel wide or more, which 3 mm
# loses in many places, and a 79x93x76 volume keeps CPU training and whole-volume validation cheap
# (2 mm would be twice the voxels). 24 cases: under half a second each to make, and every case is
# the same anatomy deformed, so more cases add little.
TISSUE_DEFAULTS = dict(cases=24, spacing=2.5, seed=0)

# Per-case T1 intensities relative to white matter (ranges of the uniform draws). The GM/WM
# ratio of real T1 scans lies around 0.6-0.8 and CSF well below GM.
_GM_RANGE = (0.55, 0.75)
_CSF_RANGE = (0.15, 0.35)
_NOISE_RANGE = (0.02, 0.05)   # Gaussian noise sigma, relative to white matter
_BIAS_RANGE = (0.10, 0.25)    # bias field: exp(+-strength)


def case_name(index: int) -> str:
    """nnU-Net case identifier of case `index`."""
    return f"tissue_{index:03d}"


def tissue_labels(brain: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """uint8 labels: in `brain`, 1 + argmax of (CSF, GM, WM) fractions, CSF = 1 - GM - WM; else 0."""
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    label = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    label[~brain] = 0
    return label


def tissue_case(rng: np.random.Generator, anatomy: Anatomy, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """One case: (X, Y, Z) float32 T1-like image and (X, Y, Z) uint8 label."""
    t1, gm, wm = deform(rng, [anatomy.t1, anatomy.gm, anatomy.wm], spacing)
    brain = brain_mask(t1)
    label = tissue_labels(brain, gm, wm)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    signal = rng.uniform(*_CSF_RANGE) * csf + rng.uniform(*_GM_RANGE) * gm + wm
    signal = signal * bias_field(rng, brain.shape, rng.uniform(*_BIAS_RANGE))
    signal = signal + rng.normal(0.0, rng.uniform(*_NOISE_RANGE), size=signal.shape)
    scale = rng.uniform(300.0, 1500.0)  # arbitrary scanner units, as in real data
    image = np.where(brain, np.clip(signal, 0.01, None) * scale, 0.0).astype(np.float32)
    return image, label


def dataset_json(cases: int) -> dict:
    """The nnU-Net v2 dataset.json of a tissue set of `cases` training cases."""
    return {"channel_names": dict(CHANNEL_NAMES), "labels": dict(LABELS), "numTraining": cases,
            "file_ending": FILE_ENDING, "name": "SegMambaTissue",
            "description": "semi-synthetic brain tissue (CSF/GM/WM) from the MNI152 template in nilearn"}


def write_tissue_dataset(out: Path, cases: int, seed: int, spacing: float) -> None:
    """Write `cases` tissue cases at isotropic `spacing` mm under `out` in the nnU-Net v2 raw
    layout. Case i depends only on (seed, i). dataset.json is written last, so its presence
    means the set is complete."""
    if cases < 1:
        raise ValueError(f"cases: expected at least 1, got {cases}")
    out = Path(out)
    anatomy = load_anatomy(spacing, antialias=True)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in progress(cases, "tissue cases"):
        image, label = tissue_case(np.random.default_rng([seed, i]), anatomy, spacing)
        name = case_name(i)
        save_nifti(nib.Nifti1Image(image, anatomy.affine), out / "imagesTr" / f"{name}_0000{FILE_ENDING}")
        save_nifti(nib.Nifti1Image(label, anatomy.affine), out / "labelsTr" / f"{name}{FILE_ENDING}")
    tmp = out / ".dataset.json.tmp"
    tmp.write_text(json.dumps(dataset_json(cases), indent=2) + "\n")
    os.replace(tmp, out / "dataset.json")
