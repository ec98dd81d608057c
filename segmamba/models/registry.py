"""Build SegMamba and the MONAI baselines by name, from plain-data configs.

``model_config(name, ...)`` resolves every constructor argument (registry defaults plus the
caller's overrides) into plain data; ``build_model(**model_config(...))`` rebuilds the same
architecture, which is what checkpoints store. Defaults follow the BraTS setups of the
SegMamba paper's comparisons: 4 input modalities, 4 output labels.

Size constraints (``min_multiple``, ``roi_size_error``): every input side must be a multiple
of the model's total downsampling: segmamba 16, unetr 16 (and its input must equal
``roi_size``, the ViT has fixed position embeddings), swinunetr / swinunetr_v2 32, segresnet
8, mednext 16. segmamba, swinunetr(_v2) and mednext normalise their deepest stage, which
fails on a single voxel, so they also need one side of at least twice the multiple (16^3 is
too small for segmamba, 32^3 for SwinUNETR). segmamba_nomamba is segmamba without its Mamba
layers (the control that shows what the scans add), with segmamba's constraints.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from monai.networks.nets import UNETR, MedNeXt, SegResNet, SwinUNETR
from torch import nn

from .channels_last import use_instance_norm_without_views
from .segmamba import SIZE_MULTIPLE, SegMamba

MODEL_NAMES = ("segmamba", "segmamba_nomamba", "unetr", "swinunetr", "swinunetr_v2", "segresnet", "mednext")

Roi = tuple[int, int, int]


@dataclass(frozen=True)
class _Spec:
    cls: type[nn.Module]
    # Constructor arguments set from (in_chans, out_chans, roi_size); callers cannot override these.
    fixed: Callable[[int, int, Roi], dict[str, Any]]
    defaults: dict[str, Any]
    multiple: int
    # Instance / group norms fail on a deepest stage of one voxel (all input sides == multiple).
    one_voxel_ok: bool = False


def _signature_defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _monai_io(in_chans: int, out_chans: int, roi: Roi) -> dict[str, Any]:
    return {"in_channels": in_chans, "out_channels": out_chans}


def _monai_io_3d(in_chans: int, out_chans: int, roi: Roi) -> dict[str, Any]:
    return {"spatial_dims": 3, "in_channels": in_chans, "out_channels": out_chans}


_SWIN = {"feature_size": 48, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24), "use_checkpoint": False}

_SEGMAMBA_DEFAULTS = {k: v for k, v in _signature_defaults(SegMamba).items() if k not in ("in_chans", "out_chans")}

_SPECS: dict[str, _Spec] = {
    "segmamba": _Spec(SegMamba, lambda i, o, roi: {"in_chans": i, "out_chans": o}, _SEGMAMBA_DEFAULTS, SIZE_MULTIPLE),
    # The control of the quality comparison: SegMamba with every Mamba layer replaced by the identity
    # (no Mamba layers at all), everything else the same, as in "nnU-Net Revisited" (Isensee et al.,
    # 2024) for U-Mamba. Its depths are fixed, so no override can put the layers back.
    "segmamba_nomamba": _Spec(SegMamba, lambda i, o, roi: {"in_chans": i, "out_chans": o, "depths": (0, 0, 0, 0)},
                              {k: v for k, v in _SEGMAMBA_DEFAULTS.items() if k != "depths"}, SIZE_MULTIPLE),
    "unetr": _Spec(UNETR, lambda i, o, roi: {"in_channels": i, "out_channels": o, "img_size": roi},
                   {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12, "proj_type": "conv",
                    "norm_name": "instance", "res_block": True, "dropout_rate": 0.0},
                   16, one_voxel_ok=True),
    "swinunetr": _Spec(SwinUNETR, _monai_io, {**_SWIN, "use_v2": False}, 32),
    "swinunetr_v2": _Spec(SwinUNETR, _monai_io, {**_SWIN, "use_v2": True}, 32),
    "segresnet": _Spec(SegResNet, _monai_io_3d,
                       {"init_filters": 16, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1), "dropout_prob": 0.2},
                       8, one_voxel_ok=True),
    # MedNeXt-B with kernel 3 (MONAI's create_mednext("B") arguments, spelled out).
    "mednext": _Spec(MedNeXt, _monai_io_3d,
                     {"init_filters": 32, "encoder_expansion_ratio": (2, 3, 4, 4),
                      "decoder_expansion_ratio": (4, 4, 3, 2), "bottleneck_expansion_ratio": 4, "kernel_size": 3,
                      "blocks_down": (2, 2, 2, 2), "blocks_bottleneck": 2, "blocks_up": (2, 2, 2, 2),
                      "use_residual_connection": True, "norm_type": "group", "global_resp_norm": False,
                      "deep_supervision": False},
                     16),
}


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"name: expected one of {MODEL_NAMES}, got {name!r}")
    return _SPECS[name]


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so a config survives JSON and pickling alike."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _roi(roi_size: int | Sequence[int]) -> Roi:
    roi = (roi_size,) * 3 if isinstance(roi_size, int) else tuple(roi_size)
    if len(roi) != 3 or not all(isinstance(s, int) and s > 0 for s in roi):
        raise ValueError(f"roi_size: expected 3 positive ints (or one), got {roi_size!r}")
    return roi  # type: ignore[return-value]


def min_multiple(name: str) -> int:
    """Every input side of model ``name`` must be a multiple of this."""
    return _spec(name).multiple


def roi_size_error(name: str, roi_size: int | Sequence[int]) -> str | None:
    """Why model ``name`` cannot take ``roi_size`` inputs (e.g. 'sides must be multiples of 32'), or None."""
    roi, multiple = _roi(roi_size), min_multiple(name)
    if any(s % multiple for s in roi):
        return f"{name} needs input sides that are multiples of {multiple}, got {roi}"
    if not _spec(name).one_voxel_ok and all(s == multiple for s in roi):
        return (f"{name} needs more than one voxel at its deepest stage (input / {multiple}), "
                f"which {roi} does not give; make one side at least {2 * multiple}")
    return None


def model_config(name: str, in_chans: int = 4, out_chans: int = 4,
                 roi_size: int | Sequence[int] = (128, 128, 128), **overrides: Any) -> dict[str, Any]:
    """Every argument of model ``name`` as plain data; ``build_model(**config)`` rebuilds it."""
    spec, roi = _spec(name), _roi(roi_size)
    fixed = spec.fixed(in_chans, out_chans, roi)
    accepted = set(inspect.signature(spec.cls.__init__).parameters) - {"self"} - set(fixed)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        owned = sorted(set(overrides) & set(fixed))
        why = f" ({owned} are set from in_chans/out_chans/roi_size or fixed for {name})" if owned else ""
        raise ValueError(f"overrides: {name} does not take {unknown}{why}; it takes {sorted(accepted)}")
    return _plain({"name": name, "in_chans": in_chans, "out_chans": out_chans, "roi_size": roi,
                   **spec.defaults, **overrides})


def build_model(name: str, in_chans: int = 4, out_chans: int = 4,
                roi_size: int | Sequence[int] = (128, 128, 128), **overrides: Any) -> nn.Module:
    """Model ``name`` (one of MODEL_NAMES) for ``in_chans`` inputs and ``out_chans`` output logits.

    ``roi_size`` is the training / sliding-window crop (UNETR is built for exactly that size);
    ``overrides`` replace the registry defaults of the model's constructor arguments. Instance
    norms are :class:`segmamba.models.channels_last.InstanceNorm3d` (the same function, faster).
    """
    cfg = model_config(name, in_chans, out_chans, roi_size, **overrides)
    spec = _spec(name)
    kwargs = {k: v for k, v in cfg.items() if k not in ("name", "in_chans", "out_chans", "roi_size")}
    model = spec.cls(**spec.fixed(in_chans, out_chans, tuple(cfg["roi_size"])), **kwargs)
    # Every model alike: the same instance norm, computed without returning views (channels_last.py).
    return use_instance_norm_without_views(model)
