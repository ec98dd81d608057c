"""Per-run metrics CSV and training-curve PNG (rank 0 only)."""

from __future__ import annotations

import csv
from pathlib import Path

from typing import Sequence

from ..data.regions import REGIONS


def columns(structures: Sequence[str] = REGIONS) -> list[str]:
    """CSV columns for a data set scored on `structures` (default BraTS's WT, TC, ET)."""
    return ["epoch", "train_loss", "lr"] + [f"val_{r}" for r in structures] + ["val_mean", "epoch_s", "elapsed_s"]


COLUMNS = columns()


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _header(path: Path) -> list[str] | None:
    with open(path, newline="") as f:
        return next(csv.reader(f), None)


def truncate(path: Path, epoch: int) -> None:
    """Drop rows after `epoch` (written by a run that died before its checkpoint)."""
    if not path.is_file():
        return
    cols = _header(path) or COLUMNS
    rows = [r for r in read_rows(path) if int(r["epoch"]) <= epoch]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)


def append_row(path: Path, row: dict, cols: Sequence[str] = COLUMNS) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, list(cols))
        if new:
            w.writeheader()
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in cols})


def plot(csv_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [float(r["train_loss"]) for r in rows])
    a.set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
    plotted = False
    for key in [k for k in rows[0] if k.startswith("val_")]:  # the structures, then the mean
        pts = [(e, float(r[key])) for e, r in zip(epochs, rows) if r[key] != ""]
        if pts:
            b.plot(*zip(*pts), marker="o", label=key[4:])
            plotted = True
    b.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice")
    if plotted:
        b.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
