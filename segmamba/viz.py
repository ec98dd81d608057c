"""One PNG per case: axial, coronal and sagittal slices through the tumour, outlines over FLAIR.

    python -m segmamba.viz --image CASE_DIR --pred PRED.nii.gz [--ref SEG.nii.gz] --out PNG

The slices cross at the centre of mass of the reference's whole tumour when a reference is given,
else of the largest connected piece of the predicted whole tumour (the volume centre if empty). Volumes are reoriented to RAS by axis flips
and permutations only (no resampling) and shown in neurological convention (patient's right on
the image's right, anterior and superior up) with the voxel aspect ratio. WT, TC and ET outlines:
prediction solid, reference dashed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from scipy import ndimage  # noqa: E402

from .data.brats import CaseError, case_files  # noqa: E402
from .data.description import Target  # noqa: E402
from .data.regions import BRATS_TARGETS, target_masks  # noqa: E402

FIGSIZE = (12.0, 4.8)   # inches; with DPI gives a fixed 1200 x 480 pixel PNG
DPI = 100
COLOURS = {"WT": "#2ca02c", "TC": "#ffd400", "ET": "#d62728"}
# TC and ET often share their outer border (enhancing rim around necrosis): TC is drawn wider so it
# shows as a halo around the ET line instead of disappearing under it.
WIDTHS = {"WT": 1.2, "TC": 2.6, "ET": 1.0}
# Other data sets' structures, in order.
_CYCLE = ("#2ca02c", "#ffd400", "#d62728", "#1f77b4", "#ff7f0e", "#9467bd", "#17becf", "#e377c2")


def _style(i: int, name: str) -> tuple[str, float]:
    return COLOURS.get(name, _CYCLE[i % len(_CYCLE)]), WIDTHS.get(name, 1.2)


def tumour_centre(pred: np.ndarray, ref: np.ndarray | None = None) -> tuple[int, int, int]:
    """Voxel nearest the centre of mass of the reference WT if given and non-empty, else of the
    largest connected component of the predicted WT (scattered false positives would pull a plain
    centre of mass off the tumour), else the volume centre."""
    if ref is not None and (ref > 0).any():
        target = ref > 0
    elif (pred > 0).any():
        components, _ = ndimage.label(pred > 0)
        target = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    else:
        return tuple(s // 2 for s in pred.shape)  # type: ignore[return-value]
    return tuple(int(round(c)) for c in ndimage.center_of_mass(target))  # type: ignore[return-value]


def _to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.orientations.apply_orientation(volume, nib.orientations.io_orientation(affine))


def _ras_spacing(affine: np.ndarray) -> np.ndarray:
    ornt = nib.orientations.io_orientation(affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    out = np.empty(3)
    out[ornt[:, 0].astype(int)] = zooms
    return out


def render_case(background: np.ndarray, affine: np.ndarray, pred: np.ndarray, ref: np.ndarray | None,
                out: str | os.PathLike, *, title: str = "", background_name: str = "t2f",
                targets: Sequence[Target] = BRATS_TARGETS) -> Path:
    """Write the three-view PNG of one case to `out` (all volumes on the grid of `affine`), with the
    outlines of `targets` (default BraTS's WT, TC, ET)."""
    for name, vol in (("pred", pred), ("ref", ref)):
        if vol is not None and vol.shape != background.shape:
            raise ValueError(f"{name}: shape {vol.shape} differs from the image shape {background.shape}")
    bg = _to_ras(background, affine)
    layers = {"prediction": target_masks(_to_ras(pred, affine), targets)}
    if ref is not None:
        layers["reference"] = target_masks(_to_ras(ref, affine), targets)
    sx, sy, sz = _ras_spacing(affine)
    cx, cy, cz = tumour_centre(_to_ras(pred, affine), None if ref is None else _to_ras(ref, affine))
    nonzero = bg[bg != 0]
    vmin, vmax = np.percentile(nonzero, (0.5, 99.5)) if nonzero.size else (0.0, 1.0)
    # (name, 2D slicer returning (horizontal, vertical) arrays, voxel aspect height/width)
    views = [(f"axial z={cz}", lambda v: v[:, :, cz], sy / sx),
             (f"coronal y={cy}", lambda v: v[:, cy, :], sz / sx),
             (f"sagittal x={cx}", lambda v: v[cx, :, :], sz / sy)]
    fig, axes = plt.subplots(1, 3, figsize=FIGSIZE, dpi=DPI)
    for ax, (label, cut, aspect) in zip(axes, views):
        ax.imshow(cut(bg).T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax, aspect=aspect,
                  interpolation="nearest")
        for layer, masks in layers.items():
            style = "solid" if layer == "prediction" else "dashed"
            for i, target in enumerate(targets):
                mask = cut(masks[i]).T
                if mask.any():
                    colour, width = _style(i, target.name)
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour,
                               linestyles=style, linewidths=width)
        ax.set_title(label, fontsize=10)
        ax.set_axis_off()
    handles = [Line2D([], [], color=_style(i, t.name)[0], linestyle="solid" if layer == "prediction" else "dashed",
                      linewidth=_style(i, t.name)[1], label=f"{t.name} {layer}")
               for layer in layers for i, t in enumerate(targets)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(f"{title}  ({background_name}; R on the right)".strip(), fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.1, wspace=0.03)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    from .evaluate import read_label
    p = argparse.ArgumentParser(prog="python -m segmamba.viz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, type=Path, help="BraTS case folder (its t2f file is shown)")
    p.add_argument("--pred", required=True, type=Path, help="predicted label NIfTI")
    p.add_argument("--ref", type=Path, help="reference label NIfTI (optional)")
    p.add_argument("--out", required=True, type=Path, help="PNG to write")
    args = p.parse_args(argv)
    try:
        flair_path = case_files(args.image, ["t2f"], with_label=False)["t2f"]
        try:
            flair_img = nib.load(str(flair_path))
            flair = flair_img.get_fdata(dtype=np.float32)
        except Exception as e:  # nibabel raises many types for truncated or foreign files
            raise CaseError(f"cannot read {flair_path}: {type(e).__name__}: {e}") from e
        pred, _ = read_label(args.pred)
        ref = read_label(args.ref)[0] if args.ref else None
        if pred.shape != flair.shape:
            raise CaseError(f"{args.pred}: shape {pred.shape} differs from {flair_path} shape {flair.shape}")
        if ref is not None and ref.shape != flair.shape:
            raise CaseError(f"{args.ref}: shape {ref.shape} differs from {flair_path} shape {flair.shape}")
        render_case(flair, flair_img.affine, pred, ref, args.out, title=args.image.name)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
