"""Per-run metrics CSV and training-curve PNG (rank 0 only)."""

from __future__ import annotations

import csv
from pathlib import Path

from ..data.regions import REGIONS

COLUMNS = ["epoch", "train_loss", "lr"] + [f"val_{r}" for r in REGIONS] + ["val_mean", "epoch_s", "elapsed_s"]


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def truncate(path: Path, epoch: int) -> None:
    """Drop rows after `epoch` (written by a run that died before its checkpoint)."""
    rows = [r for r in read_rows(path) if int(r["epoch"]) <= epoch]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})


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
    for key in [f"val_{r}" for r in REGIONS] + ["val_mean"]:
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
