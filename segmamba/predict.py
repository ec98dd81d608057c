"""Segment BraTS cases with a trained checkpoint: sliding windows, optional mirror TTA, NIfTI out.

    python -m segmamba.predict --checkpoint CKPT --input DIR_OR_CASE --out DIR [--tta] [--png]
    python -m segmamba.predict ... --input DATA --split RUN/split.json --subset test   # held-out cases only

Each case is preprocessed exactly as in training (``segmamba.data.preprocess``: crop to the brain,
z-score per modality), segmented with MONAI's sliding-window inferer (window = the training crop
stored in the checkpoint, overlap 0.5, Gaussian weighting), and the labels are pasted back into
the uncropped grid. Output: ``OUT/<case>.nii.gz`` (the BraTS2023 submission name), uint8 labels
{0, 1, 2, 3}, with the input's shape, affine and header (geometry of the first modality).
The checkpoint carries the model configuration and the modality order, so there are no
architecture flags. Checkpoints are loaded as untrusted data (``torch.load(weights_only=True)``).

Memory: windows run on ``--device``; the blended logits and the averaged probabilities of the
cropped brain (4 x about 140x170x140 float32 for a 240x240x155 BraTS case, ~50 MB each) are the
only full-volume float tensors.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint
from .data.brats import VALID_LABELS, Case, find_cases, load_case
from .data.preprocess import preprocess
from .data.split import SPLITS
from .evaluate import read_label

OVERLAP = 0.5
SPATIAL_DIMS = (2, 3, 4)  # of a (B, C, X, Y, Z) tensor
# Identity plus the 7 mirrorings over every non-empty subset of the three axes.
MIRRORS: tuple[tuple[int, ...], ...] = tuple(
    axes for k in range(len(SPATIAL_DIMS) + 1) for axes in itertools.combinations(SPATIAL_DIMS, k))


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, image: torch.Tensor, roi_size: Sequence[int], *,
                          tta: bool = False, sw_batch_size: int = 1, amp: bool = False,
                          overlap: float = OVERLAP) -> torch.Tensor:
    """Softmax probabilities (K, X, Y, Z), float32 on the model's device, of a preprocessed image.

    `image` is (C, X, Y, Z), already cropped and normalised like the training data (the trainer's
    cached volumes are). `model` must be in eval mode and map (B, C, ...) to logits (B, K, ...).
    Windows are blended in logit space with Gaussian weights; with `tta` the softmax outputs of the
    image and its 7 mirror images (each mirrored back) are averaged.
    """
    if image.ndim != 4:
        raise ValueError(f"image: expected shape (C, X, Y, Z), got {tuple(image.shape)}")
    if len(roi_size) != 3 or any(int(r) < 1 for r in roi_size):
        raise ValueError(f"roi_size: expected 3 positive ints, got {roi_size}")
    device = _model_device(model)
    x = image[None].float()
    mirrors = MIRRORS if tta else MIRRORS[:1]
    total = None
    for axes in mirrors:
        xi = x.flip(axes) if axes else x
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = sliding_window_inference(xi, roi_size=[int(r) for r in roi_size],
                                              sw_batch_size=sw_batch_size, predictor=model,
                                              overlap=overlap, mode="gaussian", sw_device=device,
                                              device=device)
        probs = torch.softmax(logits.float(), dim=1)
        del logits
        if axes:
            probs = probs.flip(axes)
        total = probs if total is None else total.add_(probs)
    return total[0].div_(len(mirrors))


def predict_case(model: torch.nn.Module, case: Case, roi_size: Sequence[int], *, tta: bool = False,
                 sw_batch_size: int = 1, amp: bool = False) -> np.ndarray:
    """uint8 label map {0..3} with the shape of `case.image`'s volume (preprocessing crop undone)."""
    cropped, bbox = preprocess(case.image)
    probs = predict_probabilities(model, torch.from_numpy(cropped), roi_size, tta=tta,
                                  sw_batch_size=sw_batch_size, amp=amp)
    if probs.shape[0] != len(VALID_LABELS):
        raise ValueError(f"model: expected {len(VALID_LABELS)} output channels (labels 0..3), "
                         f"got {probs.shape[0]}")
    labels = np.zeros(case.image.shape[1:], dtype=np.uint8)
    labels[bbox] = probs.argmax(0).to(torch.uint8).cpu().numpy()
    return labels


def save_prediction(labels: np.ndarray, case: Case, path: str | os.PathLike) -> Path:
    """Write `labels` as NIfTI with the case's affine and header; atomic (temp file + rename)."""
    path = Path(path)
    header = case.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)  # an input's intensity scaling must not rescale the labels
    img = nib.Nifti1Image(labels.astype(np.uint8, copy=False), case.affine, header)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, dict]:
    """Model in eval mode on `device` and the checkpoint's train_config; CheckpointError if unusable."""
    from .models import MODEL_NAMES, build_model, roi_size_error
    state = load_checkpoint(path)
    cfg, tcfg = state["model_config"], state["train_config"]
    if not isinstance(cfg, dict) or not isinstance(tcfg, dict):
        raise CheckpointError(f"checkpoint {path}: model_config and train_config must be dicts")
    name = cfg.get("name")
    if name not in MODEL_NAMES:
        raise CheckpointError(f"checkpoint {path}: model {name!r} is not a segmamba model "
                              f"(expected one of {list(MODEL_NAMES)})")
    roi = tcfg.get("roi_size")
    if not (isinstance(roi, (list, tuple)) and len(roi) == 3 and all(isinstance(r, int) and r > 0 for r in roi)):
        raise CheckpointError(f"checkpoint {path}: train_config roi_size must be 3 positive ints, got {roi!r}")
    if (why := roi_size_error(name, roi)) is not None:
        raise CheckpointError(f"checkpoint {path}: train_config roi_size does not fit the model: {why}")
    mods = tcfg.get("modalities")
    if not (isinstance(mods, (list, tuple)) and mods and all(isinstance(m, str) for m in mods)):
        raise CheckpointError(f"checkpoint {path}: train_config modalities must be a list of names, got {mods!r}")
    in_chans = cfg.get("in_chans", len(mods))
    if in_chans != len(mods):
        raise CheckpointError(f"checkpoint {path}: model takes in_chans={in_chans} channels but "
                              f"train_config lists {len(mods)} modalities {list(mods)}")
    try:
        model = build_model(**cfg)
        model.load_state_dict(state["model"], strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: weights do not fit model {name!r} built from its "
                              f"model_config {cfg}: {e}") from e
    return model.to(device).eval(), tcfg


def input_cases(path: str | os.PathLike) -> list[Path]:
    """One case folder (files named <folder>-<modality>.nii.gz) or every case folder under `path`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--input: not a directory: {path}")
    own = [f for f in path.iterdir()
           if f.is_file() and f.name.startswith(f"{path.name}-") and f.name.endswith((".nii", ".nii.gz"))]
    return [path] if own else find_cases(path)


def select_subset(cases: list[Path], split_file: Path, subset: str) -> list[Path]:
    """The cases of `subset` in a split JSON written by segmamba.train; all of them must be present."""
    try:
        split = json.loads(Path(split_file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"--split: cannot read {split_file}: {e}") from e
    if not isinstance(split, dict) or not isinstance(split.get(subset), list):
        raise FileNotFoundError(f"--split: expected a JSON object with a list under {subset!r}, got {split_file}")
    by_name = {c.name: c for c in cases}
    missing = sorted(set(split[subset]) - set(by_name))
    if missing:
        raise FileNotFoundError(f"--split: {len(missing)} {subset} case(s) not found under --input: "
                                + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return [by_name[n] for n in sorted(split[subset])]


def _reference(case_dir: Path) -> np.ndarray | None:
    """The case's own segmentation for the picture, if the folder has one."""
    found = [case_dir / f"{case_dir.name}-seg{ext}" for ext in (".nii.gz", ".nii")]
    found = [p for p in found if p.is_file()]
    return read_label(found[0])[0] if found else None


def _write_png(case: Case, case_dir: Path, labels: np.ndarray, modalities: Sequence[str], out: Path) -> None:
    from .viz import render_case  # matplotlib only when pictures are asked for
    channel = list(modalities).index("t2f") if "t2f" in modalities else 0
    render_case(case.image[channel], case.affine, labels, _reference(case_dir), out,
                title=case.name, background_name=modalities[channel])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segmamba.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint written by segmamba.train")
    p.add_argument("--input", required=True, type=Path,
                   help="one BraTS case folder, or a folder of case folders")
    p.add_argument("--out", required=True, type=Path, help="output folder for <case>.nii.gz (created)")
    p.add_argument("--split", type=Path, help="split JSON from segmamba.train: predict only the --subset cases")
    p.add_argument("--subset", choices=SPLITS, default="test", help="which cases of --split (default test)")
    p.add_argument("--tta", action="store_true", help="average over the 8 mirror images (3 axes); 8x slower")
    p.add_argument("--png", action="store_true",
                   help="also write <case>.png: axial/coronal/sagittal slices with outlines over FLAIR")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default cuda if available)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the model")
    p.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.sw_batch_size < 1:
        print(f"error: --sw-batch-size: expected a positive int, got {args.sw_batch_size}", file=sys.stderr)
        return 2
    try:
        model, tcfg = load_model(args.checkpoint, args.device)
        cases = input_cases(args.input)
        if args.split is not None:
            cases = select_subset(cases, args.split, args.subset)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    modalities, roi = list(tcfg["modalities"]), tcfg["roi_size"]
    args.out.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for case_dir in tqdm(cases, unit="case", desc="predict", disable=args.no_progress):
        try:
            case = load_case(case_dir, modalities, with_label=False)
            labels = predict_case(model, case, roi, tta=args.tta, sw_batch_size=args.sw_batch_size,
                                  amp=args.amp)
            save_prediction(labels, case, args.out / f"{case.name}.nii.gz")
            if args.png:
                _write_png(case, case_dir, labels, modalities, args.out / f"{case.name}.png")
        except (ValueError, OSError) as e:  # CaseError is a ValueError; nibabel errors surface as either
            failures.append(f"{case_dir.name}: {e}")
            tqdm.write(f"failed: {case_dir.name}: {e}", file=sys.stderr)
    print(f"predicted {len(cases) - len(failures)} of {len(cases)} case(s) into {args.out}")
    if failures:
        print(f"{len(failures)} case(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
