"""Find the cases of a data set folder in any supported layout, detected from the folder.

* a folder with ``dataset.json``: an nnU-Net v2 raw data set (``imagesTr/CASE_XXXX.nii.gz``, one file
  per channel, ``labelsTr/CASE.nii.gz``, optional ``imagesTs/``) or a Decathlon task (cases listed
  under ``training``; 4D images);
* otherwise a BraTS2023 folder (one sub-folder per case).

:func:`image_folder_cases` reads a folder of images only (nnU-Net's ``imagesTs``, a Decathlon
``imagesTs``), for prediction.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .brats import brats_source, find_cases
from .description import BRATS_MODALITIES, FILE_ENDINGS, DatasetDescription, brats_description, read_dataset_json
from .loading import CaseSource

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class DataSource:
    root: Path
    description: DatasetDescription
    cases: list[CaseSource]                                  # labelled (training) cases, sorted by name
    unlabelled: list[CaseSource] = field(default_factory=list)  # imagesTs / the test list, if any


def _stem(path: Path, endings: Sequence[str] = FILE_ENDINGS) -> str | None:
    if path.name.startswith("."):  # hidden files, including macOS "._x.nii.gz" resource forks
        return None
    for ext in endings:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return None


def _nifti_stems(folder: Path, endings: Sequence[str]) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(s for p in folder.iterdir() if p.is_file() and (s := _stem(p, endings)) is not None)


def _nnunet_sources(images: Path, labels: Path | None, desc: DatasetDescription) -> list[CaseSource]:
    """Cases named by any image or label file; missing partners surface as CaseError on reading."""
    ending = desc.file_ending
    names = {m["case"] for s in _nifti_stems(images, (ending,)) if (m := _CHANNEL_SUFFIX.match(s))}
    if labels is not None:
        names |= set(_nifti_stems(labels, (ending,)))
    return [CaseSource(n, tuple(images / f"{n}_{c.key}{ending}" for c in desc.channels),
                       None if labels is None else labels / f"{n}{ending}") for n in sorted(names)]


def _msd_sources(root: Path, entries, what: str) -> list[CaseSource]:
    if not isinstance(entries, list):
        raise ValueError(f"{root / 'dataset.json'}: {what}: expected a list, got {type(entries).__name__}")
    out = []
    for e in entries:
        image = e.get("image") if isinstance(e, dict) else e
        if not isinstance(image, str):
            raise ValueError(f"{root / 'dataset.json'}: {what}: expected image paths, got {e!r}")
        label = e.get("label") if isinstance(e, dict) else None
        path = root / image  # "./imagesTr/x.nii.gz": pathlib drops the "." part
        name = _stem(path) or path.name
        out.append(CaseSource(name, (path,), None if label is None else root / label))
    return sorted(out, key=lambda c: c.name)


def open_dataset(root: str | Path, modalities: Sequence[str] | None = None) -> DataSource:
    """The description and cases of the data set in `root` (layout detected from the folder).

    `modalities` chooses and orders the channels of a BraTS folder (default t2w t2f t1n t1c); other
    layouts take their channels from dataset.json.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root: not a directory: {root}")
    if not (root / "dataset.json").is_file():
        desc = brats_description(modalities or BRATS_MODALITIES)
        return DataSource(root, desc, [brats_source(d, desc.channel_names()) for d in find_cases(root)])
    if modalities is not None:
        raise ValueError(f"--modalities: applies to BraTS folders only; {root} has a dataset.json that "
                         f"names its channels")
    desc, meta = read_dataset_json(root)
    if desc.layout == "nnunet":
        cases = _nnunet_sources(root / "imagesTr", root / "labelsTr", desc)
        test = _nnunet_sources(root / "imagesTs", None, desc)
    else:
        cases = _msd_sources(root, meta["training"], "training")
        test = _msd_sources(root, meta.get("test", []), "test")
    declared = meta.get("numTraining")
    if not cases:
        raise FileNotFoundError(f"data root {root}: dataset.json found but no training cases "
                                f"(expected imagesTr/ and labelsTr/)")
    if isinstance(declared, int) and declared != len(cases):
        warnings.warn(f"{root / 'dataset.json'}: numTraining is {declared} but {len(cases)} training "
                      f"case(s) were found", stacklevel=2)
    return DataSource(root, desc, cases, test)


def image_folder_cases(folder: str | Path, desc: DatasetDescription) -> list[CaseSource]:
    """Cases of a folder of images without labels.

    Files named ``CASE_XXXX<ending>`` (nnU-Net) are grouped by case, channel i being ``_{i:04d}``;
    otherwise every NIfTI file is one case holding all channels (4D when there are several, as in
    the Decathlon).
    """
    folder = Path(folder)
    stems = _nifti_stems(folder, FILE_ENDINGS)
    if not stems:
        raise FileNotFoundError(f"--input: no NIfTI files in {folder}")
    if all(_CHANNEL_SUFFIX.match(s) for s in stems):
        ending = next(e for e in FILE_ENDINGS if any((folder / f"{s}{e}").is_file() for s in stems))
        found: dict[str, int] = {}  # case -> highest channel number present
        for m in map(_CHANNEL_SUFFIX.match, stems):
            found[m["case"]] = max(found.get(m["case"], 0), int(m["channel"]))  # type: ignore[index]
        # A case with more channel files than the model takes lists them all, so reading it fails
        # with the count instead of ignoring the extra files.
        return [CaseSource(n, tuple(folder / f"{n}_{i:04d}{ending}" for i in range(max(len(desc.channels), top + 1))))
                for n, top in sorted(found.items())]
    return [CaseSource(s, (next(folder / f"{s}{e}" for e in FILE_ENDINGS if (folder / f"{s}{e}").is_file()),))
            for s in stems]
