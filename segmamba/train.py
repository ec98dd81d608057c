"""Train a segmentation model on BraTS2023 or the embedded semi-synthetic set.

    python -m segmamba.train                       # semi-synthetic set, small SegMamba, ~10 min on 2 CPU cores
    python -m segmamba.train --data BraTS2023/     # the paper's recipe
    torchrun --nproc_per_node=2 -m segmamba.train  # data-parallel

Run `python -m segmamba.train --help` for every option.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data.brats import find_cases
from .data.cache import build_cache, settings_key
from .data.dataset import PatchDataset, RankSampler, VolumeDataset
from .data.regions import REGION_LABELS, REGIONS
from .data.split import load_or_create_split
from .host_memory import OPT_OUT, keep_freed_memory
from .training import config as cfg
from .training import report
from .training.distributed import Dist, setup, teardown
from .training.loop import NonFiniteLossError, make_loss, poly_lambda, train_epoch
from .training.state import restore_training_state, save_training_state
from .training.validate import validate

NUM_LABELS = 4  # background, necrotic core, oedema, enhancing tumour


def log(d: Dist, *msg) -> None:
    if d.main:
        print(*msg, flush=True)


def ensure_synthetic(args, d: Dist) -> Path:
    """Generate the semi-synthetic set into --synth-dir unless the same settings are already there."""
    from .data import synth

    root = args.synth_dir
    wanted = {"cases": args.synth_cases, "spacing": args.synth_spacing, "seed": cfg.SYNTH_DEFAULTS["seed"]}
    marker = root / "synth.json"
    if d.main:
        if marker.is_file():
            have = json.loads(marker.read_text())
            if have != wanted:
                raise SystemExit(f"--synth-dir {root} holds a semi-synthetic set made with {have}, but this run "
                                 f"asks for {wanted}; remove the folder or pass another --synth-dir")
        else:
            log(d, f"generating {args.synth_cases} semi-synthetic cases at {args.synth_spacing} mm in {root} ...")
            t0 = time.time()
            synth.write_dataset(root, args.synth_cases, wanted["seed"], args.synth_spacing)
            marker.write_text(json.dumps(wanted))
            log(d, f"  done in {time.time() - t0:.0f} s")
    d.barrier()
    return root


def prepare_data(args, d: Dist):
    data_dir = args.data if args.data is not None else ensure_synthetic(args, d)
    cases = find_cases(data_dir)
    cache_dir = args.cache_dir or data_dir / ".cache"
    if d.main:
        build_cache(cases, cache_dir, args.modalities, progress=not args.no_progress)
    d.barrier()
    good, bad = build_cache(cases, cache_dir, args.modalities)
    if bad:
        log(d, f"skipping {len(bad)} bad case(s):\n  " + "\n  ".join(bad.values()))
    if not good:
        raise SystemExit(f"--data {data_dir}: no usable cases")
    split_path = args.split or data_dir / "split.json"
    if d.main:
        load_or_create_split(split_path, [c.name for c in good], args.split_seed)
    d.barrier()
    split = load_or_create_split(split_path, [c.name for c in good], args.split_seed)
    by_name = {c.name: c for c in good}
    train = [by_name[n] for n in split["train"]]
    val = [by_name[n] for n in split["val"]]
    if not val:
        log(d, "warning: the split has no validation cases (too few cases); validating on a training case")
        val = train[:1]
    return data_dir, train, val, split


def train_config(args, data_dir: Path) -> dict:
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"roi_size": list(args.roi), "modalities": list(args.modalities),
            "spacing": (f"{args.synth_spacing} mm isotropic (semi-synthetic)" if args.data is None
                        else "native (no resampling)"),
            "preprocessing": f"crop to non-zero bbox + per-modality z-score over non-zero voxels "
                             f"(cache key {settings_key(args.modalities)})",
            "label_scheme": {"labels": {"0": "background", "1": "necrotic core", "2": "oedema",
                                        "3": "enhancing tumour"},
                             "regions": {r: list(REGION_LABELS[r]) for r in REGIONS}, "out_chans": NUM_LABELS},
            "data": str(data_dir), "args": plain}


def build_model(args, device: torch.device):
    from .models import build_model as registry_build, model_config, roi_size_error

    err = roi_size_error(args.model, args.roi)
    if err:
        raise SystemExit(f"--roi: {err}")
    mcfg = model_config(args.model, in_chans=len(args.modalities), out_chans=NUM_LABELS,
                        roi_size=tuple(args.roi), **args.model_args)
    return registry_build(**mcfg).to(device), mcfg


def make_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                               weight_decay=args.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def run(args) -> int:
    d, device = setup(args.device)
    try:
        return _run(args, d, device)
    finally:
        teardown(d)


def _run(args, d: Dist, device: torch.device) -> int:
    t_start = time.time()
    not_applied = keep_freed_memory()
    log(d, f"malloc: freed memory kept for reuse between steps ({OPT_OUT}=0 turns this off)" if not_applied is None
        else f"malloc: C library defaults ({not_applied})")
    if args.resume and args.out is None:
        raise SystemExit("--resume: pass the run folder to continue with --out RUN_DIR")
    data_dir, train_cases, val_cases, split = prepare_data(args, d)
    out = args.out or Path("runs") / f"{args.model}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    tcfg = train_config(args, data_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(tcfg["args"], indent=1))
        (out / "split.json").write_text(json.dumps(split, indent=1))
    log(d, f"data {data_dir}: {len(train_cases)} train / {len(val_cases)} val cases; run folder {out}")

    torch.manual_seed(args.seed)
    model, mcfg = build_model(args, device)
    optimizer = make_optimizer(args, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(args.epochs * args.iters_per_epoch))
    start_epoch, best, best_epoch = 0, -math.inf, -1
    if args.resume:
        ckpt_path = out / "last.pt" if args.resume == "last" else Path(args.resume)
        ckpt = restore_training_state(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                      device=device)
        start_epoch, best, best_epoch = ckpt["epoch"], ckpt["best_metric"], ckpt["best_epoch"]
        if d.main:
            report.truncate(out / "metrics.csv", start_epoch)
        log(d, f"resumed from {ckpt_path} after epoch {start_epoch}")
    net = model
    if d.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    samples = args.iters_per_epoch * args.batch_size * d.world
    train_ds = PatchDataset(train_cases, args.roi, samples, args.seed, args.pos_fraction, args.elastic)
    loader = DataLoader(train_ds, batch_size=args.batch_size,
                        sampler=RankSampler(samples, args.batch_size, d.rank, d.world),
                        num_workers=args.workers, pin_memory=device.type == "cuda")
    val_volumes = VolumeDataset(val_cases[d.rank::d.world])
    loss_fn = make_loss(args.loss)
    csv_path, last_path = out / "metrics.csv", out / "last.pt"
    show = d.main and not args.no_progress
    stop = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    dice = None
    for epoch in range(start_epoch, stop):
        t0 = time.time()
        train_ds.set_epoch(epoch)
        with tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show,
                  dynamic_ncols=True, leave=False) as bar:
            try:
                loss = train_epoch(net, loader, loss_fn, optimizer, scheduler, device, d, amp=args.amp,
                                   clip=args.clip, epoch=epoch, progress=bar)
            except NonFiniteLossError as e:
                if d.main:
                    kept = (f"the last good checkpoint is {last_path}" if last_path.is_file()
                            else "no checkpoint was written yet")
                    print(f"error: training stopped: {e}; {kept}. Try a lower --lr, --clip or no --amp.",
                          file=sys.stderr, flush=True)
                return 2
        dice = None
        if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
            with tqdm(total=len(val_volumes), desc="validate", disable=not show, leave=False) as bar:
                dice = validate(model, val_volumes, args.roi, device, d, amp=args.amp,
                                sw_batch_size=args.batch_size, progress=bar)
        if d.main:
            row = {"epoch": epoch + 1, "train_loss": f"{loss:.6f}", "lr": f"{optimizer.param_groups[0]['lr']:.6g}",
                   "epoch_s": f"{time.time() - t0:.1f}", "elapsed_s": f"{time.time() - t_start:.1f}"}
            msg = f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} ({time.time() - t0:.0f} s)"
            if dice is not None:
                row.update({f"val_{r}": f"{dice[r]:.4f}" for r in REGIONS} | {"val_mean": f"{dice['mean']:.4f}"})
                msg += " | val Dice " + " ".join(f"{r} {dice[r]:.3f}" for r in REGIONS) + f" mean {dice['mean']:.3f}"
            log(d, msg)
            report.append_row(csv_path, row)
            report.plot(csv_path, out / "curves.png")
            improved = dice is not None and dice["mean"] > best
            if improved:
                best, best_epoch = dice["mean"], epoch + 1
            state = dict(model=model, model_config=mcfg, train_config=tcfg, epoch=epoch + 1, optimizer=optimizer,
                         scheduler=scheduler, best_metric=best, best_epoch=best_epoch)
            save_training_state(last_path, **state)
            if improved:
                save_training_state(out / "best.pt", **state)
        d.barrier()
    if dice is not None:
        log(d, "final validation Dice (" + f"{len(val_cases)} cases): "
            + " ".join(f"{r} {dice[r]:.4f}" for r in REGIONS) + f" | mean {dice['mean']:.4f}")
    log(d, f"best mean Dice {best:.4f} at epoch {best_epoch}; wall time {time.time() - t_start:.0f} s; outputs in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(cfg.parse(argv))


if __name__ == "__main__":
    sys.exit(main())
