"""Read one case of any layout, checking everything before use.

A case is a :class:`CaseSource`: its image files (one per channel, as BraTS and nnU-Net store
them, or one 4D file with the channels last, as the Decathlon does) and its label file. Bad cases
raise :class:`CaseError` naming the case and the file (missing channel, shape or affine mismatch,
labels outside the data set's set, NaN, unreadable file), so a data set can be screened up front
instead of crashing mid-epoch. :func:`inspect_case` runs the checks that need only the headers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .description import DatasetDescription

# Voxel-to-world matrices written by different tools differ in float rounding.
AFFINE_ATOL = 1e-3


class CaseError(ValueError):
    """A case is incomplete, inconsistent or unreadable; the message names the case and file."""


@dataclass
class Case:
    name: str
    image: np.ndarray            # float32 (C, X, Y, Z), channels in the description's order
    label: np.ndarray | None     # uint8 (X, Y, Z), values in the description's label set
    affine: np.ndarray           # 4x4 voxel -> world (of the first image file)
    header: nib.Nifti1Header     # header of the first image file, to write outputs with its geometry
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class CaseSource:
    name: str
    images: tuple[Path, ...]     # one file per channel, or one file holding all channels (channels last)
    label: Path | None = None

    def files(self) -> list[Path]:
        return list(self.images) + ([self.label] if self.label is not None else [])


@dataclass(frozen=True)
class CaseHeader:
    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]


def _open(case: str, path: Path) -> nib.Nifti1Image:
    try:
        return nib.load(str(path))  # reads the header only; the voxels are decoded on demand
    except Exception as e:  # nibabel raises many types for truncated or foreign files
        raise CaseError(f"case {case}: cannot read {path.name}: {type(e).__name__}: {e}") from e


def _decode(case: str, path: Path, img: nib.Nifti1Image) -> np.ndarray:
    try:
        return img.get_fdata(dtype=np.float32)  # a truncated gzip only fails here
    except Exception as e:
        raise CaseError(f"case {case}: cannot read {path.name}: {type(e).__name__}: {e}") from e


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    # Tools often write a 3D volume as (X, Y, Z, 1).
    return shape[:3] if len(shape) == 4 and shape[3] == 1 else shape


def _image_files(src: CaseSource, desc: DatasetDescription) -> list[tuple[Path, str]]:
    """(file, what it holds) pairs; CaseError when the file count does not fit the channels."""
    n = len(desc.channels)
    if len(src.images) == n:
        return [(p, c.describe()) for p, c in zip(src.images, desc.channels)]
    if len(src.images) == 1:
        return [(src.images[0], "image")]
    raise CaseError(f"case {src.name}: {len(src.images)} image files for {n} channels "
                    f"({', '.join(desc.channel_names())})")


def inspect_case(src: CaseSource, desc: DatasetDescription, with_label: bool = True) -> CaseHeader:
    """Header-level checks (files present and readable, shapes and affines agree) and the geometry."""
    files = _image_files(src, desc)
    if with_label:
        if src.label is None:
            raise CaseError(f"case {src.name}: no label file")
        files.append((src.label, "label"))
    for path, what in files:
        if not path.is_file():
            raise CaseError(f"case {src.name}: missing {what} file (expected {path})")
    ref_path = files[0][0]
    ref = _open(src.name, ref_path)
    ref_shape = tuple(int(s) for s in ref.shape)
    n = len(desc.channels)
    if len(src.images) == 1 and n > 1:
        if len(ref_shape) != 4 or ref_shape[3] != n:
            raise CaseError(f"case {src.name}: {ref_path.name} has shape {ref_shape}, expected (X, Y, Z, {n}): "
                            f"one volume per channel ({', '.join(desc.channel_names())})")
        spatial = ref_shape[:3]
    else:
        spatial = _spatial(ref_shape)
    if len(spatial) != 3:
        raise CaseError(f"case {src.name}: {ref_path.name} has shape {ref_shape}, expected a 3D volume")
    for path, _ in files[1:]:
        img = _open(src.name, path)
        shape = _spatial(tuple(int(s) for s in img.shape))
        if shape != spatial:
            raise CaseError(f"case {src.name}: {path.name} has shape {shape}, expected {spatial} as in {ref_path.name}")
        if not np.allclose(img.affine, ref.affine, atol=AFFINE_ATOL):
            raise CaseError(f"case {src.name}: {path.name} has a different affine from {ref_path.name}")
    spacing = tuple(float(z) for z in ref.header.get_zooms()[:3])
    return CaseHeader(spatial, ref.affine.copy(), spacing)  # type: ignore[arg-type]


def check_label(case: str, path: Path, label: np.ndarray, desc: DatasetDescription) -> np.ndarray:
    """`label` as uint8 with the description's aliases applied; CaseError if a value is outside its set."""
    if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
        raise CaseError(f"case {case}: {path.name} holds non-integer label values")
    values = set(np.unique(label).astype(np.int64).tolist())
    for alias, value in desc.label_aliases:
        if alias in values:
            name = desc.label_names[desc.label_values.index(value)]
            warnings.warn(f"case {case}: {path.name} uses label {alias} for {name} (an older convention of "
                          f"{desc.name}); read as {value}", stacklevel=3)
            label = np.where(label == alias, value, label)
            values = (values - {alias}) | {value}
    bad = sorted(values - set(desc.label_values))
    if bad:
        allowed = ", ".join(str(v) for v in desc.label_values)
        raise CaseError(f"case {case}: {path.name} has labels {bad} outside {{{allowed}}}")
    return label.astype(np.uint8)


def load_case(src: CaseSource, desc: DatasetDescription, with_label: bool = True) -> Case:
    """Read and check one case: every file present and readable, one grid, labels in the set, no NaN."""
    head = inspect_case(src, desc, with_label)
    channels = []
    for path, _ in _image_files(src, desc):
        img = _open(src.name, path)
        data = _decode(src.name, path, img)
        if not np.all(np.isfinite(data)):
            raise CaseError(f"case {src.name}: {path.name} holds NaN or infinite values")
        if data.ndim == 4:  # channels last (Decathlon), or a trailing axis of length 1
            channels.extend(np.moveaxis(data, 3, 0))
        else:
            channels.append(data)
    label = None
    if with_label:
        assert src.label is not None  # inspect_case checked it
        label = check_label(src.name, src.label, _decode(src.name, src.label, _open(src.name, src.label)).reshape(head.shape), desc)
    first = _open(src.name, src.images[0])
    return Case(name=src.name, image=np.ascontiguousarray(np.stack(channels), dtype=np.float32), label=label,
                affine=first.affine.copy(), header=first.header.copy(), spacing=head.spacing)


def source_stamp(src: CaseSource) -> list[list]:
    """[path, size, mtime_ns] of every file of the case: changes whenever a file is replaced."""
    out = []
    for p in src.files():
        st = p.stat() if p.is_file() else None
        out.append([str(p), st.st_size if st else -1, st.st_mtime_ns if st else -1])
    return out
