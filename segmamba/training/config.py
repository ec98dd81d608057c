"""Command line of `python -m segmamba.train` and its presets.

Options left unset take the preset's value: `brats` (with --data, any layout) is the SegMamba
paper's recipe; `synthetic` (no --data, --task tumour) and `tissue` (--task tissue) are small
configurations tuned to train on the embedded data sets on 2 CPU cores in minutes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.brats import MODALITIES
from ..data.plan import SPACING_CHOICES
from ..data.synth_tissue import TISSUE_DEFAULTS

PRESETS: dict[str, dict] = {
    "brats": dict(model="segmamba", model_args={}, roi=[128, 128, 128], batch_size=2, optimizer="sgd",
                  lr=1e-2, momentum=0.99, weight_decay=3e-5, loss="ce", epochs=1000, iters_per_epoch=250,
                  val_every=10, clip=12.0, pos_fraction=0.5, workers=4),
    "synthetic": dict(model="segmamba", model_args={"feat_size": [8, 16, 32, 64], "hidden_size": 64,
                                                          "depths": [1, 1, 1, 1]},
                      roi=[32, 32, 32], batch_size=2, optimizer="adamw", lr=3e-3, momentum=0.9,
                      weight_decay=1e-5, loss="dicece", epochs=8, iters_per_epoch=30, val_every=4,
                      clip=12.0, pos_fraction=0.67, workers=1),
    "tissue": dict(model="segmamba", model_args={"feat_size": [8, 16, 32, 64], "hidden_size": 64,
                                                       "depths": [1, 1, 1, 1]},
                   roi=[48, 48, 48], batch_size=2, optimizer="adamw", lr=3e-3, momentum=0.9,
                   weight_decay=1e-5, loss="dicece", epochs=8, iters_per_epoch=30, val_every=4,
                   clip=12.0, pos_fraction=0.5, workers=1),
}
SYNTH_DEFAULTS = dict(cases=30, spacing=3.0, seed=0)
# The embedded tasks: preset, generated set (defaults) and where it is generated.
TASKS: dict[str, dict] = {
    "tumour": dict(preset="synthetic", synth=SYNTH_DEFAULTS, dir=Path("data/synthetic")),
    "tissue": dict(preset="tissue", synth=TISSUE_DEFAULTS, dir=Path("data/tissue")),
}


def _preset_table() -> str:
    rows = [f"  --{k.replace('_', '-'):<16} {PRESETS['brats'][k]!s:<22} {PRESETS['synthetic'][k]!s:<30} "
            f"{PRESETS['tissue'][k]!s}" for k in PRESETS["brats"]]
    return ("preset defaults:\n  option             brats (--data)         synthetic (--task tumour)      "
            "tissue (--task tissue)\n" + "\n".join(rows))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m segmamba.train", description=__doc__ + "\n" + _preset_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Multi-process: torchrun --nproc_per_node=N -m segmamba.train ... (gloo on CPU, nccl on CUDA); "
               "--batch-size is per process. Outputs in --out: metrics.csv, curves.png, last.pt, best.pt, "
               "split.json, args.json.")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, help="data set folder, layout detected: BraTS2023 (one sub-folder per "
                   "case), nnU-Net v2 raw (dataset.json, imagesTr/, labelsTr/) or a Decathlon task "
                   "(dataset.json, 4D images). Without it: the embedded set of --task, generated into "
                   "--synth-dir if not there yet")
    g.add_argument("--task", choices=list(TASKS),
                   help="embedded set when there is no --data: tumour (BraTS-like glioma, 4 MRI channels, "
                        "the default) or tissue (CSF/GM/WM from one T1 channel, nnU-Net layout)")
    g.add_argument("--synth-dir", type=Path,
                   help="where the embedded set lives / is generated (default data/synthetic for tumour, "
                        "data/tissue for tissue)")
    g.add_argument("--synth-cases", type=int,
                   help=f"number of embedded cases (default {SYNTH_DEFAULTS['cases']} tumour, "
                        f"{TISSUE_DEFAULTS['cases']} tissue)")
    g.add_argument("--synth-spacing", type=float,
                   help=f"voxel size in mm of the embedded set (default {SYNTH_DEFAULTS['spacing']} tumour, "
                        f"{TISSUE_DEFAULTS['spacing']} tissue)")
    g.add_argument("--modalities", nargs="+",
                   help=f"BraTS folders only: input channels in order (default {' '.join(MODALITIES)})")
    g.add_argument("--spacing", nargs="+", default=["median"], metavar="MM",
                   help="target spacing: median (nnU-Net's rule over the training cases; the default), "
                        "native (no resampling) or 3 numbers in mm")
    g.add_argument("--cache-dir", type=Path, help="preprocessed-array cache (default DATA/.cache)")
    g.add_argument("--split", type=Path, help="split JSON, created if missing (default DATA/split.json)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the 70/10/20 split (default 0)")
    g.add_argument("--workers", type=int, help="data-loader worker processes per rank")
    g.add_argument("--pos-fraction", type=float, help="share of crops centred on tumour")
    g.add_argument("--elastic", action="store_true",
                   help="add elastic deformation to the augmentation (off by default: slow on CPU)")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="registry model name (segmamba.models.MODEL_NAMES)")
    m.add_argument("--model-args", type=json.loads,
                   help='JSON dict of build_model overrides, e.g. \'{"feat_size": [16, 32, 64, 128]}\'')
    m.add_argument("--roi", type=int, nargs="+", help="training crop / sliding-window size (1 or 3 ints)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, help="number of epochs")
    o.add_argument("--iters-per-epoch", type=int, help="optimiser steps per epoch")
    o.add_argument("--batch-size", type=int, help="crops per step and process")
    o.add_argument("--optimizer", choices=["sgd", "adamw"], help="sgd (nesterov) or adamw")
    o.add_argument("--lr", type=float, help="initial learning rate (poly decay, power 0.9, per step)")
    o.add_argument("--momentum", type=float, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, help="weight decay")
    o.add_argument("--loss", choices=["ce", "dicece"],
                   help="ce: cross-entropy (softmax over the labels; region-based data sets: binary per region); "
                        "dicece: + soft Dice")
    o.add_argument("--clip", type=float, help="gradient-norm clipping (0 = off)")
    o.add_argument("--amp", action="store_true", help="bf16 autocast")
    r = p.add_argument_group("run")
    r.add_argument("--out", type=Path, help="run folder (default runs/<model>-<data>-<time>)")
    r.add_argument("--val-every", type=int, help="validate every N epochs (and after the last)")
    r.add_argument("--resume", nargs="?", const="last", metavar="CKPT",
                   help="continue a run: from OUT/last.pt, or the checkpoint given")
    r.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N epochs of this session (e.g. to fit a job time limit); "
                        "continue later with --resume")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="run the model in channels-last 3D memory format (segmamba.models.channels_last; "
                        "default: on for a CPU device, where oneDNN's convolutions are faster in it; off for CUDA)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the model for training (costs minutes of compilation at the start; "
                        "pays off for long runs)")
    r.add_argument("--seed", type=int, default=0, help="training seed (init, sampling, augmentation)")
    r.add_argument("--deterministic", action="store_true",
                   help="bitwise reproducible gradients: our kernels' deterministic backward and PyTorch's "
                        "deterministic algorithms (on a GPU: estimated +10%% scan backward time; the CPU "
                        "kernels are deterministic always)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.channels_last is None:
        args.channels_last = args.device.startswith("cpu")
    if args.data is not None and args.task is not None:
        p.error("--task: picks an embedded data set; it cannot be combined with --data")
    args.task = args.task or "tumour"
    task = TASKS[args.task]
    args.preset = "brats" if args.data is not None else task["preset"]
    args.synth_dir = args.synth_dir or task["dir"]
    args.synth_cases = task["synth"]["cases"] if args.synth_cases is None else args.synth_cases
    args.synth_spacing = task["synth"]["spacing"] if args.synth_spacing is None else args.synth_spacing
    args.synth_seed = task["synth"]["seed"]
    raw = args.spacing
    if len(raw) == 1 and raw[0] in SPACING_CHOICES:
        args.spacing = raw[0]
    else:
        try:
            values = [float(v) for v in raw]
        except ValueError:
            values = []
        if len(values) != 3 or min(values) <= 0:
            p.error(f"--spacing: expected median, native or 3 positive numbers of mm, got {' '.join(raw)}")
        args.spacing = values
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if len(args.roi) == 1:
        args.roi = args.roi * 3
    checks = [("--roi", len(args.roi) == 3 and min(args.roi) > 0, "1 or 3 positive ints", args.roi),
              ("--epochs", args.epochs >= 1, "an int >= 1", args.epochs),
              ("--iters-per-epoch", args.iters_per_epoch >= 1, "an int >= 1", args.iters_per_epoch),
              ("--batch-size", args.batch_size >= 1, "an int >= 1", args.batch_size),
              ("--val-every", args.val_every >= 1, "an int >= 1", args.val_every),
              ("--lr", args.lr > 0, "a positive number", args.lr),
              ("--workers", args.workers >= 0, "an int >= 0", args.workers),
              ("--model-args", isinstance(args.model_args, dict), "a JSON object", args.model_args)]
    for name, ok, expected, given in checks:
        if not ok:
            p.error(f"{name}: expected {expected}, got {given}")
    return args
