"""Segment cases with a trained checkpoint: sliding windows, optional mirror TTA, NIfTI out.

    python -m segmamba.predict --checkpoint CKPT --input DIR_OR_CASE --out DIR [--tta] [--png]
    python -m segmamba.predict ... --input DATA --split RUN/split.json --subset test   # held-out cases only

--input: a data set folder of any layout the trainer reads (BraTS2023, nnU-Net v2 raw, Decathlon:
its labelled cases), one BraTS case folder, or a folder of images (nnU-Net ``CASE_XXXX.nii.gz``
files as in imagesTr/imagesTs, or one 3D/4D file per case as in a Decathlon imagesTs).

Each case is preprocessed exactly as in training (``segmamba.data.preprocess``: crop to the
non-zero box, normalisation per channel, resampling to the training spacing), segmented with
MONAI's sliding-window inferer (window = the training crop stored in the checkpoint, overlap 0.5,
Gaussian weighting); the probabilities are resampled back to the case's own grid, turned into
labels (argmax, or for region-based data sets regions -> labels by ``regions_class_order``) and
pasted into the uncropped volume. Output: ``OUT/<case>.nii.gz`` (the BraTS2023 submission and
nnU-Net names), uint8 in the data set's label values, with the input's shape, affine and header
(geometry of the first image file). The checkpoint carries the model configuration and the data
set description (channels, labels, regions, spacing, normalisation statistics), so there are no
architecture or data flags. Checkpoints are loaded as untrusted data (``torch.load(weights_only=True)``).

Memory: windows run on ``--device``; the blended logits and the averaged probabilities of the
cropped volume (K x about 140x170x140 float32 for a 240x240x155 BraTS case, ~50 MB per channel)
are the only full-volume float tensors.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from . import cpu_threads  # noqa: F401  first: it sets the OpenMP wait policy before torch loads libgomp

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint
from .data.brats import brats_source, find_cases
from .data.description import DatasetDescription, brats_description
from .data.layouts import image_folder_cases, open_dataset
from .data.loading import Case, CaseSource, load_case
from .data.preprocess import preprocess_case, restore
from .data.regions import outputs_to_labels
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
                          overlap: float = OVERLAP, activation: str = "softmax") -> torch.Tensor:
    """Probabilities (K, X, Y, Z), float32 on the model's device, of a preprocessed image.

    `image` is (C, X, Y, Z), already cropped and normalised like the training data (the trainer's
    cached volumes are). `model` must be in eval mode and map (B, C, ...) to logits (B, K, ...).
    Windows are blended in logit space with Gaussian weights; `activation` "softmax" (exclusive
    labels) or "sigmoid" (one probability per region); with `tta` the probabilities of the image
    and its 7 mirror images (each mirrored back) are averaged.
    """
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation: expected 'softmax' or 'sigmoid', got {activation!r}")
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
        probs = torch.softmax(logits.float(), dim=1) if activation == "softmax" else torch.sigmoid(logits.float())
        del logits
        if axes:
            probs = probs.flip(axes)
        total = probs if total is None else total.add_(probs)
    return total[0].div_(len(mirrors))


def predict_case(model: torch.nn.Module, case: Case, roi_size: Sequence[int], *,
                 description: DatasetDescription | None = None, tta: bool = False,
                 sw_batch_size: int = 1, amp: bool = False) -> np.ndarray:
    """uint8 label map (the description's label values; default BraTS 0..3) on the grid of
    `case.image` (crop and resampling undone)."""
    desc = description or brats_description()
    image, _, geom = preprocess_case(case.image, case.spacing, desc)
    probs = predict_probabilities(model, torch.from_numpy(image), roi_size, tta=tta, sw_batch_size=sw_batch_size,
                                  amp=amp, activation="sigmoid" if desc.region_based else "softmax")
    if probs.shape[0] != desc.out_channels:
        raise ValueError(f"model: expected {desc.out_channels} output channels ({desc.outputs}), "
                         f"got {probs.shape[0]}")
    labels = np.zeros(case.image.shape[1:], dtype=np.uint8)
    labels[geom.bbox] = outputs_to_labels(restore(probs, geom), desc, logits=False).cpu().numpy()
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


def checkpoint_description(tcfg: dict) -> DatasetDescription:
    """The data set description a checkpoint was trained with (BraTS with its modalities for
    checkpoints written before descriptions were recorded)."""
    if "dataset" in tcfg:
        return DatasetDescription.from_dict(tcfg["dataset"])
    return brats_description(tcfg["modalities"])


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
        desc = checkpoint_description(tcfg)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: train_config dataset: {e}") from e
    out_chans = cfg.get("out_chans", desc.out_channels)
    if desc.channel_names() != list(mods) or out_chans != desc.out_channels:
        raise CheckpointError(f"checkpoint {path}: the model ({in_chans} in, {out_chans} out) does not fit its "
                              f"data set description ({len(desc.channels)} channels, {desc.outputs})")
    try:
        model = build_model(**cfg)
        model.load_state_dict(state["model"], strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: weights do not fit model {name!r} built from its "
                              f"model_config {cfg}: {e}") from e
    return model.to(device).eval(), tcfg


def input_cases(path: str | os.PathLike, desc: DatasetDescription | None = None) -> list[CaseSource]:
    """The cases to segment: a data set folder (its labelled cases), one BraTS case folder (files
    named <folder>-<modality>.nii.gz), a folder of BraTS case folders, or a folder of images."""
    desc = desc or brats_description()
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--input: not a directory: {path}")
    if (path / "dataset.json").is_file():
        try:
            return open_dataset(path).cases
        except ValueError as e:
            raise FileNotFoundError(f"--input: {e}") from e
    names = desc.channel_names()
    files = [f for f in path.iterdir() if f.is_file() and f.name.endswith((".nii", ".nii.gz"))]
    if any(f.name.startswith(f"{path.name}-") for f in files):
        return [brats_source(path, names, with_label=False)]
    if files:
        return image_folder_cases(path, desc)
    return [brats_source(c, names, with_label=False) for c in find_cases(path)]


def select_subset(cases: list[CaseSource], split_file: Path, subset: str) -> list[CaseSource]:
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


def _reference(src: CaseSource, desc: DatasetDescription) -> np.ndarray | None:
    """The case's own segmentation for the picture, if the data set has one."""
    label = src.label
    if label is None and src.images and src.images[0].parent.name == src.name:  # a BraTS case folder
        label = brats_source(src.images[0].parent, []).label
    return read_label(label, desc)[0] if label is not None and label.is_file() else None


def _write_png(case: Case, src: CaseSource, labels: np.ndarray, desc: DatasetDescription, out: Path) -> None:
    from .viz import render_case  # matplotlib only when pictures are asked for
    names = desc.channel_names()
    channel = names.index("t2f") if "t2f" in names else 0
    render_case(case.image[channel], case.affine, labels, _reference(src, desc), out,
                title=case.name, background_name=names[channel], targets=desc.evaluation)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segmamba.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint written by segmamba.train")
    p.add_argument("--input", "--data", required=True, type=Path,
                   help="a data set folder (BraTS2023, nnU-Net v2 raw or Decathlon: its labelled cases), one "
                        "BraTS case folder, or a folder of images (nnU-Net CASE_XXXX.nii.gz as in imagesTs, "
                        "or one 3D/4D file per case)")
    p.add_argument("--out", required=True, type=Path, help="output folder for <case>.nii.gz (created)")
    p.add_argument("--split", type=Path, help="split JSON from segmamba.train: predict only the --subset cases")
    p.add_argument("--subset", choices=SPLITS, default="test", help="which cases of --split (default test)")
    p.add_argument("--tta", action="store_true", help="average over the 8 mirror images (3 axes); 8x slower")
    p.add_argument("--png", action="store_true",
                   help="also write <case>.png: axial/coronal/sagittal slices with outlines over FLAIR "
                        "(the first channel when there is no t2f)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default cuda if available)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the model")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="run the model in channels-last 3D memory format (default: on for a CPU device, off for CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (minutes of compilation first; pays off for many cases)")
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
        desc = checkpoint_description(tcfg)
        cases = input_cases(args.input, desc)
        if args.split is not None:
            cases = select_subset(cases, args.split, args.subset)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    channels_last = torch.device(args.device).type == "cpu" if args.channels_last is None else args.channels_last
    if channels_last:
        from .models.channels_last import to_channels_last

        to_channels_last(model)
    if args.compile:
        model = torch.compile(model)
    roi = tcfg["roi_size"]
    args.out.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for src in tqdm(cases, unit="case", desc="predict", disable=args.no_progress):
        try:
            case = load_case(src, desc, with_label=False)
            labels = predict_case(model, case, roi, description=desc, tta=args.tta,
                                  sw_batch_size=args.sw_batch_size, amp=args.amp)
            save_prediction(labels, case, args.out / f"{case.name}.nii.gz")
            if args.png:
                _write_png(case, src, labels, desc, args.out / f"{case.name}.png")
        except (ValueError, OSError) as e:  # CaseError is a ValueError; nibabel errors surface as either
            failures.append(f"{src.name}: {e}")
            tqdm.write(f"failed: {src.name}: {e}", file=sys.stderr)
    print(f"predicted {len(cases) - len(failures)} of {len(cases)} case(s) into {args.out}")
    if failures:
        print(f"{len(failures)} case(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
