"""Weights of the public SegMamba code (github.com/ge-xing/SegMamba) in our SegMamba.

The public model is the same network under other module names (docs/design.md §4). Its
state-dict names, and ours:

    vit.downsample_layers.0.0.*               encoder.downsample.0.*          stem conv
    vit.downsample_layers.{i}.1.*             encoder.downsample.{i}.1.*      conv after the norm
    vit.gscs.{i}.proj / proj2 / proj3 / proj4 encoder.gscs.{i}.spatial.0.0 / spatial.1.0 / pointwise.0 / gate.0
    vit.stages.{i}.{j}.norm.*                 encoder.stages.{i}.{j}.norm.*
    vit.stages.{i}.{j}.mamba.in_proj|out_proj encoder.stages.{i}.{j}.mixer.in_proj|out_proj
    vit.stages.{i}.{j}.mamba.conv1d{s}.*, x_proj{s}.*, dt_proj{s}.*, A{s}_log, D{s}
                                              encoder.stages.{i}.{j}.mixer.directions.{k}.conv1d.*, ...
                                              s = "" forward (k 0), "_b" reverse (k 1), "_s" inter-slice (k 2)
    vit.mlps.{i}.fc1 / fc2                    encoder.outputs.{i}.1 / .3      (after the stage norm)
    encoder1..5, decoder1..5, out             the same names (the same MONAI blocks)

Its instance norms have no parameters, so nothing else is stored. Loaded weights compute the
public model's function exactly where its hard-coded inter-slice counts (64, 32, 16, 8 per
stage) equal the feature-map depth: inputs of depth 128, such as the 128^3 crops it trains on.
Elsewhere our inter-slice scan follows the actual depth (docs/design.md §4).

``python -m segmamba.convert_public PUBLIC.pt --out segmamba.pt`` converts a public BraTS
checkpoint into one that ``segmamba.predict`` and ``segmamba.evaluate`` use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from segmamba_kernels import ORDERS

from .segmamba import SegMamba

# Direction suffix of the public Mamba module (its bimamba "v3": forward, backward, spatial).
_SUFFIX = {"forward": "", "reverse": "_b", "inter_slice": "_s"}
# Public modality order of its BraTS2023 preprocessing.
PUBLIC_BRATS_MODALITIES = ("t2w", "t2f", "t1n", "t1c")
_DECODER = re.compile(r"(encoder[1-5]|decoder[1-5]|out)\.")
_GSC = {"spatial.0.0": "proj", "spatial.1.0": "proj2", "pointwise.0": "proj3", "gate.0": "proj4"}
_MLP = {"1": "fc1", "3": "fc2"}


class PublicWeightsError(ValueError):
    """A state dict does not fit the model under the public SegMamba's names."""


def _public_name(ours: str) -> str:
    """The public code's name of our state-dict entry `ours`."""
    if _DECODER.match(ours):
        return ours
    if m := re.fullmatch(r"encoder\.downsample\.0\.(weight|bias)", ours):
        return f"vit.downsample_layers.0.0.{m[1]}"
    if m := re.fullmatch(r"encoder\.downsample\.(\d+)\.1\.(weight|bias)", ours):
        return f"vit.downsample_layers.{m[1]}.1.{m[2]}"
    if (m := re.fullmatch(r"encoder\.gscs\.(\d+)\.(\w+\.\d+(?:\.\d+)?)\.(weight|bias)", ours)) and m[2] in _GSC:
        return f"vit.gscs.{m[1]}.{_GSC[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.(\d+)\.norm\.(weight|bias)", ours):
        return f"vit.stages.{m[1]}.{m[2]}.norm.{m[3]}"
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.(\d+)\.mixer\.(in_proj|out_proj)\.weight", ours):
        return f"vit.stages.{m[1]}.{m[2]}.mamba.{m[3]}.weight"
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.(\d+)\.mixer\.directions\.(\d)\.(.+)", ours):
        layer, k, rest = f"vit.stages.{m[1]}.{m[2]}.mamba", int(m[3]), m[4]
        s = _SUFFIX[ORDERS[k]]
        if rest in ("A_log", "D"):
            return f"{layer}.{rest[0]}{s}{rest[1:]}"
        module, param = rest.split(".")
        return f"{layer}.{module}{s}.{param}"
    if (m := re.fullmatch(r"encoder\.outputs\.(\d+)\.(\d)\.(weight|bias)", ours)) and m[2] in _MLP:
        return f"vit.mlps.{m[1]}.{_MLP[m[2]]}.{m[3]}"
    raise KeyError(ours)


def public_names(model: SegMamba) -> dict[str, str]:
    """Public name -> our name, for every entry of ``model.state_dict()``."""
    names = {}
    for ours in model.state_dict():
        try:
            names[_public_name(ours)] = ours
        except KeyError:
            raise PublicWeightsError(f"model: no public name for our parameter {ours!r} "
                                     f"(is this a SegMamba of segmamba.models?)") from None
    return names


def public_to_ours(model: SegMamba, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` (public names) renamed to `model`'s names, every entry checked.

    Raises PublicWeightsError listing the public names that are missing, the ones that are
    unexpected (nothing is dropped) and the ones whose shape differs from `model`'s.
    """
    if not isinstance(model, SegMamba):
        raise PublicWeightsError(f"model: expected a segmamba.models.SegMamba, got {type(model).__name__}")
    names = public_names(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(names) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(names))
    wrong = sorted(f"{k}: {tuple(state_dict[k].shape)} (ours {tuple(shapes[names[k]])})"
                   for k in set(names) & set(state_dict) if state_dict[k].shape != shapes[names[k]])
    if missing or unexpected or wrong:
        hint = (" (keys start with 'module.': read the file with read_public_checkpoint)"
                if any(k.startswith("module.") for k in unexpected) else "")
        found = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
        parts = [f"{what} ({len(keys)}): {', '.join(keys)}" for what, keys in found if keys]
        raise PublicWeightsError("state_dict does not fit the model under the public SegMamba's names; "
                                 + "; ".join(parts) + hint)
    return {names[k]: v for k, v in state_dict.items()}


def load_public_state_dict(model: SegMamba, state_dict: Mapping[str, Tensor]) -> None:
    """Load a state dict of the public SegMamba into `model` (in place), all or nothing.

    `model` must have the public model's configuration (see :func:`public_model_config`).
    Raises PublicWeightsError, before changing `model`, if any entry is missing, unexpected or
    of another shape.
    """
    model.load_state_dict(public_to_ours(model, state_dict), strict=True)


def public_model_config(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """SegMamba keyword arguments (in/out channels, depths, widths, hidden size, d_state, d_conv,
    expand) read off the shapes of a public state dict."""
    def get(key: str) -> Tensor:
        if key not in state_dict:
            raise PublicWeightsError(f"state_dict: missing {key!r}; is this a public SegMamba state dict?")
        return state_dict[key]

    stem = get("vit.downsample_layers.0.0.weight")
    feat = [stem.shape[0]] + [get(f"vit.downsample_layers.{i}.1.weight").shape[0] for i in (1, 2, 3)]
    depths = [len({k.split(".")[3] for k in state_dict if k.startswith(f"vit.stages.{i}.")}) for i in range(4)]
    first = next((i for i, d in enumerate(depths) if d), None)
    if first is None:
        raise PublicWeightsError("state_dict: no Mamba layer under vit.stages; cannot read d_state, d_conv, expand")
    layer = f"vit.stages.{first}.0.mamba"
    return {"in_chans": stem.shape[1], "out_chans": get("out.conv.conv.weight").shape[0], "depths": depths,
            "feat_size": feat, "hidden_size": get("encoder5.layer.conv1.conv.weight").shape[0],
            "d_state": get(f"{layer}.A_log").shape[1], "d_conv": get(f"{layer}.conv1d.weight").shape[2],
            "expand": get(f"{layer}.in_proj.weight").shape[0] // (2 * feat[first])}


def read_public_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict in a file saved by the public code: a plain state dict, or one under a
    "module" key, names prefixed by "module." when saved from DistributedDataParallel (both
    unwrapped, as the public prediction script does). Read with weights_only=True."""
    sd = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("module"), dict):
        sd = sd["module"]
    if not (isinstance(sd, dict) and all(isinstance(v, Tensor) for v in sd.values())):
        raise PublicWeightsError(f"{path}: expected a state dict (names -> tensors), got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def convert_public_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, roi_size: tuple[int, int, int],
                              modalities: tuple[str, ...] = PUBLIC_BRATS_MODALITIES) -> Path:
    """Write the public checkpoint `src` of a BraTS model (4 output labels) as a segmamba
    checkpoint `dst` that segmamba.predict reads: our weights, the model configuration, `roi_size`
    (the public code trains on 128^3) and the input channel order `modalities` (the public
    BraTS2023 order by default). Other tasks: build the model from :func:`public_model_config`
    and use :func:`load_public_state_dict`."""
    from ..checkpoint import save_checkpoint
    from .registry import build_model, model_config

    sd = read_public_checkpoint(src)
    cfg = public_model_config(sd)
    if cfg["out_chans"] != 4:
        raise PublicWeightsError(f"out_chans: a converted checkpoint is for the 4 BraTS labels, got {cfg['out_chans']} "
                                 f"outputs; load the state dict with load_public_state_dict instead")
    if cfg["in_chans"] != len(modalities):
        raise PublicWeightsError(f"modalities: the model takes {cfg['in_chans']} channels, got {len(modalities)}: "
                                 f"{list(modalities)}")
    config = model_config("segmamba", **cfg)
    model = build_model(**config)
    load_public_state_dict(model, sd)
    return save_checkpoint(dst, {"model_config": config, "model": model.state_dict(),
                                 "train_config": {"roi_size": list(roi_size), "modalities": list(modalities)},
                                 "epoch": 0})
