"""Train a segmentation model on BraTS2023, any nnU-Net v2 / Decathlon data set, or an embedded set.

    python -m segmamba.train                       # semi-synthetic tumour set, small SegMamba, 2 CPU cores
    python -m segmamba.train --task tissue         # semi-synthetic CSF/GM/WM set (nnU-Net layout)
    python -m segmamba.train --data BraTS2023/     # the paper's recipe (also: an nnU-Net or Decathlon folder)
    torchrun --nproc_per_node=2 -m segmamba.train  # data-parallel

Run `python -m segmamba.train --help` for every option.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from . import cpu_threads  # first: it sets the OpenMP wait policy, which libgomp reads when torch loads it

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data.cache import build_cache, settings_key
from .data.dataset import PatchDataset, RankSampler, VolumeDataset
from .data.description import DatasetDescription
from .data.layouts import open_dataset
from .data.loading import CaseError, inspect_case
from .data.plan import plan_dataset
from .data.split import load_or_create_split
from .host_memory import OPT_OUT, keep_freed_memory
from .training import config as cfg
from .training import report
from .training.distributed import Dist, setup, teardown
from .training.loop import NonFiniteLossError, make_loss, poly_lambda, train_epoch
from .training.state import restore_training_state, save_training_state
from .training.validate import validate

def log(d: Dist, *msg) -> None:
    if d.main:
        print(*msg, flush=True)


def ensure_synthetic(args, d: Dist) -> Path:
    """Generate the embedded set of --task into --synth-dir unless the same settings are already there."""
    root = args.synth_dir
    wanted = {"cases": args.synth_cases, "spacing": args.synth_spacing, "seed": args.synth_seed}
    if args.task != "tumour":  # the tumour set's marker predates tasks: keep it valid as written
        wanted["task"] = args.task
    marker = root / "synth.json"
    if d.main:
        if marker.is_file():
            have = json.loads(marker.read_text())
            if have != wanted:
                raise SystemExit(f"--synth-dir {root} holds a semi-synthetic set made with {have}, but this run "
                                 f"asks for {wanted}; remove the folder or pass another --synth-dir")
        else:
            log(d, f"generating {args.synth_cases} semi-synthetic {args.task} cases at {args.synth_spacing} mm "
                   f"in {root} ...")
            t0 = time.time()
            if args.task == "tissue":
                from .data.synth_tissue import write_tissue_dataset
                write_tissue_dataset(root, args.synth_cases, args.synth_seed, args.synth_spacing)
            else:
                from .data.synth import write_dataset
                write_dataset(root, args.synth_cases, args.synth_seed, args.synth_spacing)
            marker.write_text(json.dumps(wanted))
            log(d, f"  done in {time.time() - t0:.0f} s")
    d.barrier()
    return root


def prepare_data(args, d: Dist):
    """Open the data set, split it, plan its preprocessing from the training cases and cache it.

    Cases failing the header checks (missing or mismatched files) never enter the split; cases
    failing on their voxels (unreadable data, labels outside the set) are skipped where found.
    Returns (data folder, planned description, train cases, val cases, split).
    """
    data_dir = args.data if args.data is not None else ensure_synthetic(args, d)
    try:
        source = open_dataset(data_dir, args.modalities)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--data: {e}")
    desc = source.description
    cache_dir = args.cache_dir or data_dir / ".cache"
    bad: dict[str, str] = {}
    usable = []
    for src in source.cases:
        try:
            inspect_case(src, desc)
            usable.append(src)
        except CaseError as e:
            bad[src.name] = str(e)
    if not usable:
        raise SystemExit(f"--data {data_dir}: no usable cases" + "".join(f"\n  {m}" for m in bad.values()))
    split_path = args.split or data_dir / "split.json"
    if d.main:
        load_or_create_split(split_path, [c.name for c in usable], args.split_seed)
    d.barrier()
    split = load_or_create_split(split_path, [c.name for c in usable], args.split_seed)
    by_name = {c.name: c for c in usable}
    fit = [by_name[n] for n in split["train"] + split["val"]]
    train_sources = [by_name[n] for n in split["train"]]
    try:
        if d.main:  # rank 0 computes and caches; then every rank reads the cache
            planned, _ = plan_dataset(desc, train_sources, args.spacing, cache_dir, progress=not args.no_progress)
            build_cache(fit, cache_dir, planned, progress=not args.no_progress)
        d.barrier()
        planned, bad_plan = plan_dataset(desc, train_sources, args.spacing, cache_dir)
        good, bad_cache = build_cache(fit, cache_dir, planned)
    except ValueError as e:
        raise SystemExit(f"--data {data_dir}: {e}")
    bad.update(bad_plan)
    bad.update(bad_cache)
    if bad:
        log(d, f"skipping {len(bad)} bad case(s):\n  " + "\n  ".join(bad.values()))
    cached = {c.name: c for c in good if c.name not in bad}
    train = [cached[n] for n in split["train"] if n in cached]
    val = [cached[n] for n in split["val"] if n in cached]
    if not train:
        raise SystemExit(f"--data {data_dir}: no usable training cases")
    if not val:
        log(d, "warning: the split has no validation cases (too few cases); validating on a training case")
        val = train[:1]
    return data_dir, planned, train, val, split


def train_config(args, data_dir: Path, desc: DatasetDescription) -> dict:
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    norms = ", ".join(f"{c.name}: {c.norm}" for c in desc.channels)
    return {"roi_size": list(args.roi), "modalities": desc.channel_names(), "dataset": desc.to_dict(),
            "spacing": ("native (no resampling)" if desc.spacing is None
                        else f"{' x '.join(f'{s:g}' for s in desc.spacing)} mm"
                        + (" (semi-synthetic)" if args.data is None else "")),
            "preprocessing": f"crop to non-zero bbox + normalisation per channel ({norms}) + resampling to the "
                             f"target spacing (cache key {settings_key(desc)})",
            "label_scheme": {"labels": {str(v): n for v, n in zip(desc.label_values, desc.label_names)},
                             "regions": {t.name: list(t.labels) for t in desc.evaluation},
                             "outputs": desc.outputs, "out_chans": desc.out_channels},
            "data": str(data_dir), "args": plain}


def build_model(args, device: torch.device, desc: DatasetDescription):
    from .models import build_model as registry_build, model_config, roi_size_error

    err = roi_size_error(args.model, args.roi)
    if err:
        raise SystemExit(f"--roi: {err}")
    mcfg = model_config(args.model, in_chans=len(desc.channels), out_chans=desc.out_channels,
                        roi_size=tuple(args.roi), **args.model_args)
    return registry_build(**mcfg).to(device), mcfg


def make_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                               weight_decay=args.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def use_deterministic_algorithms() -> None:
    """--deterministic: PyTorch's switch, which our kernels follow (their deterministic backward,
    docs/design.md §3), and what PyTorch needs besides on a GPU. PyTorch ops without a deterministic
    implementation warn (naming the op) instead of stopping the run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS makes its first handle
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def run(args) -> int:
    if args.deterministic:
        use_deterministic_algorithms()
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
    if device.type == "cpu":
        log(d, cpu_threads.describe())
    if args.resume and args.out is None:
        raise SystemExit("--resume: pass the run folder to continue with --out RUN_DIR")
    data_dir, desc, train_cases, val_cases, split = prepare_data(args, d)
    out = args.out or Path("runs") / f"{args.model}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    tcfg = train_config(args, data_dir, desc)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(tcfg["args"], indent=1))
        (out / "split.json").write_text(json.dumps(split, indent=1))
    log(d, f"data {data_dir} ({desc.name}, {desc.layout} layout; {len(desc.channels)} channel(s) "
           f"{' '.join(desc.channel_names())}; outputs: {desc.outputs}): {len(train_cases)} train / "
           f"{len(val_cases)} val cases; run folder {out}")

    torch.manual_seed(args.seed)
    model, mcfg = build_model(args, device, desc)
    if args.channels_last:
        from .models.channels_last import to_channels_last

        to_channels_last(model)
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
    if args.compile:  # the training forward only; validation windows run the plain model
        net = torch.compile(net)

    samples = args.iters_per_epoch * args.batch_size * d.world
    train_ds = PatchDataset(train_cases, args.roi, samples, args.seed, args.pos_fraction, args.elastic)
    loader = DataLoader(train_ds, batch_size=args.batch_size,
                        sampler=RankSampler(samples, args.batch_size, d.rank, d.world),
                        num_workers=args.workers, pin_memory=device.type == "cuda")
    val_volumes = VolumeDataset(val_cases[d.rank::d.world])
    # Region-based data sets train one sigmoid per region; others a softmax over labels.
    loss_fn = make_loss(args.loss, desc.regions) if desc.region_based else make_loss(args.loss)
    structures = [t.name for t in desc.evaluation]
    columns = report.columns(structures)
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
                                sw_batch_size=args.batch_size, progress=bar, description=desc)
        if d.main:
            row = {"epoch": epoch + 1, "train_loss": f"{loss:.6f}", "lr": f"{optimizer.param_groups[0]['lr']:.6g}",
                   "epoch_s": f"{time.time() - t0:.1f}", "elapsed_s": f"{time.time() - t_start:.1f}"}
            msg = f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} ({time.time() - t0:.0f} s)"
            if dice is not None:
                row.update({f"val_{r}": f"{dice[r]:.4f}" for r in structures} | {"val_mean": f"{dice['mean']:.4f}"})
                msg += " | val Dice " + " ".join(f"{r} {dice[r]:.3f}" for r in structures) + f" mean {dice['mean']:.3f}"
            log(d, msg)
            report.append_row(csv_path, row, columns)
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
        val_from = (f"{len(val_cases)} validation case(s)" if split["val"]
                    else f"{len(val_cases)} training case (the split has no validation case)")
        log(d, f"final validation Dice ({val_from}): "
            + " ".join(f"{r} {dice[r]:.4f}" for r in structures) + f" | mean {dice['mean']:.4f}")
    log(d, f"best mean Dice {best:.4f} at epoch {best_epoch}; wall time {time.time() - t_start:.0f} s; outputs in {out}")
    if d.main and split["test"]:
        log(d, held_out_commands(out, data_dir, len(split["test"])))
    return 0


def _shell_path(path: Path | str) -> str:
    """`path` relative to the working directory when it lies under it, shell-quoted."""
    p = Path(path)
    try:
        p = p.resolve().relative_to(Path.cwd().resolve()) if p.is_absolute() else p
    except ValueError:
        pass
    return shlex.quote(str(p))


def held_out_commands(out: Path, data_dir: Path, n_test: int) -> str:
    """The summary's last lines: how the held-out test split is scored (training never touches it)."""
    python = _shell_path(sys.executable) if os.sep in sys.executable else "python"
    ckpt = out / "best.pt" if (out / "best.pt").is_file() else out / "last.pt"
    pred = out / "test"
    return (f"the held-out test split ({n_test} case(s)) is scored with predict, then evaluate:\n"
            f"  {python} -m segmamba.predict --checkpoint {_shell_path(ckpt)} --input {_shell_path(data_dir)} "
            f"--split {_shell_path(out / 'split.json')} --subset test --out {_shell_path(pred)}\n"
            f"  {python} -m segmamba.evaluate --pred {_shell_path(pred)} --ref {_shell_path(data_dir)}")


def main(argv: list[str] | None = None) -> int:
    return run(cfg.parse(argv))


if __name__ == "__main__":
    sys.exit(main())
