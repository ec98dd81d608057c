"""What a data set is and how its images reach the network: the one description every layer uses.

A :class:`DatasetDescription` names the input channels (each with its normalisation), the label
values, what the network outputs (one softmax channel per label, or for region-based data sets one
sigmoid channel per region, as nnU-Net trains them), what evaluation scores, and the
preprocessing plan (target spacing, intensity statistics of CT channels). It is plain data
(:meth:`DatasetDescription.to_dict`), so a checkpoint carries it and prediction needs nothing else.

Three layouts are described:

* BraTS2023 folders (:func:`brats_description`): 4 MRI channels, labels 0..3 (label 4 of older
  BraTS read as 3), scored on the nested regions WT, TC, ET;
* nnU-Net v2 raw data sets (:func:`nnunet_description`): ``dataset.json`` with ``channel_names``,
  ``labels`` (a list value makes a region: region-based training, with ``regions_class_order``),
  ``numTraining`` and ``file_ending``;
* Medical Segmentation Decathlon tasks (:func:`msd_description`): ``dataset.json`` with
  ``modality``, ``labels`` (value -> name) and ``training``; multi-channel images are 4D.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

# Normalisation per channel kind (nnU-Net's channel-name mapping): "zscore" over the image's
# non-zero voxels, "ct" clip to the training foreground's 0.5-99.5 percentiles then z-score with
# its mean/std, "rescale" to [0, 1], "none".
NORMALISATIONS = ("zscore", "ct", "rescale", "none")
LAYOUTS = ("brats", "nnunet", "msd")
FILE_ENDINGS = (".nii.gz", ".nii")

BRATS_MODALITIES: tuple[str, ...] = ("t2w", "t2f", "t1n", "t1c")  # order of the public SegMamba code
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
BRATS_LABEL_NAMES = ("background", "necrotic core", "oedema", "enhancing tumour")


@dataclass(frozen=True)
class Channel:
    name: str   # as the data set names it ("t2w", "T1", "CT")
    key: str    # finds its file: BraTS suffix ("t2w"), nnU-Net channel id ("0000"), MSD index ("0")
    norm: str   # one of NORMALISATIONS

    def describe(self) -> str:
        return self.key if self.key == self.name else f"channel {self.key} ({self.name})"


@dataclass(frozen=True)
class Target:
    """A structure made of one or more label values (a label, or a region such as WT = {1, 2, 3})."""
    name: str
    labels: tuple[int, ...]


@dataclass(frozen=True)
class IntensityStats:
    """Foreground intensities of one channel over the training cases (CT normalisation)."""
    mean: float
    std: float
    low: float    # 0.5th percentile
    high: float   # 99.5th percentile


def _targets(items: Sequence[Target | Sequence]) -> tuple[Target, ...]:
    return tuple(t if isinstance(t, Target) else Target(str(t[0]), tuple(int(v) for v in t[1])) for t in items)


@dataclass(frozen=True)
class DatasetDescription:
    name: str
    layout: str                               # one of LAYOUTS: how cases are found and read
    channels: tuple[Channel, ...]
    label_values: tuple[int, ...]             # every value a label map may hold, sorted, 0 first
    label_names: tuple[str, ...]              # one per value
    evaluation: tuple[Target, ...]            # what validation and evaluate score
    regions: tuple[Target, ...] = ()          # non-empty: region-based (one sigmoid output per region)
    regions_class_order: tuple[int, ...] = ()  # label written where region i is predicted (later wins)
    label_aliases: tuple[tuple[int, int], ...] = ()  # value read as another (BraTS: 4 -> 3)
    file_ending: str = ".nii.gz"
    spacing: tuple[float, float, float] | None = None  # target spacing in mm; None: keep each case's own
    intensity: tuple[IntensityStats | None, ...] = field(default=())  # per channel once planned

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "label_values", tuple(int(v) for v in self.label_values))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        object.__setattr__(self, "evaluation", _targets(self.evaluation))
        object.__setattr__(self, "regions", _targets(self.regions))
        object.__setattr__(self, "regions_class_order", tuple(int(v) for v in self.regions_class_order))
        object.__setattr__(self, "label_aliases", tuple((int(a), int(b)) for a, b in self.label_aliases))
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "intensity", tuple(self.intensity))
        self._check()

    def _check(self) -> None:
        where = f"data set {self.name!r}"
        if self.layout not in LAYOUTS:
            raise ValueError(f"{where}: layout: expected one of {LAYOUTS}, got {self.layout!r}")
        if not self.channels:
            raise ValueError(f"{where}: channels: expected at least one input channel, got none")
        for c in self.channels:
            if c.norm not in NORMALISATIONS:
                raise ValueError(f"{where}: channel {c.name!r}: normalisation expected one of "
                                 f"{NORMALISATIONS}, got {c.norm!r}")
        values = self.label_values
        if not values or values[0] != 0 or list(values) != sorted(set(values)) or values[-1] > 255:
            raise ValueError(f"{where}: labels: expected distinct sorted values in 0..255 starting with 0 "
                             f"(background), got {list(values)}")
        if len(self.label_names) != len(values):
            raise ValueError(f"{where}: label_names: expected {len(values)} names, got {len(self.label_names)}")
        if not self.regions and list(values) != list(range(len(values))):
            # One softmax output per label: output channel k must be label k.
            raise ValueError(f"{where}: labels: expected consecutive values 0..{len(values) - 1} "
                             f"(as nnU-Net requires), got {list(values)}")
        if self.regions and len(self.regions_class_order) != len(self.regions):
            raise ValueError(f"{where}: regions_class_order: expected one label per region "
                             f"({len(self.regions)}: {[r.name for r in self.regions]}), "
                             f"got {list(self.regions_class_order)}")
        for what, targets in (("regions", self.regions), ("evaluation", self.evaluation)):
            for t in targets:
                bad = sorted(set(t.labels) - set(values)) if t.labels else ["(none)"]
                if bad or 0 in t.labels:
                    raise ValueError(f"{where}: {what}: {t.name!r} must be made of foreground labels "
                                     f"{list(values[1:])}, got {list(t.labels)}")
        bad_order = sorted(set(self.regions_class_order) - set(values[1:]))
        if bad_order:
            raise ValueError(f"{where}: regions_class_order: values {bad_order} are not foreground labels")
        if not self.evaluation:
            raise ValueError(f"{where}: evaluation: expected at least one structure to score")
        if self.file_ending not in FILE_ENDINGS:
            raise ValueError(f"{where}: file_ending: expected one of {FILE_ENDINGS} (NIfTI), "
                             f"got {self.file_ending!r}")
        if self.spacing is not None and (len(self.spacing) != 3 or not all(s > 0 for s in self.spacing)):
            raise ValueError(f"{where}: spacing: expected 3 positive numbers of mm, got {self.spacing}")
        if self.intensity and len(self.intensity) != len(self.channels):
            raise ValueError(f"{where}: intensity: expected one entry per channel ({len(self.channels)}), "
                             f"got {len(self.intensity)}")

    # ------------------------------------------------------------------ derived facts

    @property
    def region_based(self) -> bool:
        return bool(self.regions)

    @property
    def out_channels(self) -> int:
        return len(self.regions) if self.regions else len(self.label_values)

    @property
    def outputs(self) -> str:
        """What the network's output channels are, for messages."""
        if self.regions:
            return "sigmoid per region: " + ", ".join(r.name for r in self.regions)
        return "softmax over labels " + ", ".join(str(v) for v in self.label_values)

    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]

    def needs_intensity_stats(self) -> bool:
        return any(c.norm == "ct" for c in self.channels)

    def planned(self, spacing: Sequence[float] | None, intensity: Sequence[IntensityStats | None]) -> "DatasetDescription":
        """The same description with a preprocessing plan (target spacing, channel statistics)."""
        return replace(self, spacing=None if spacing is None else tuple(float(s) for s in spacing),
                       intensity=tuple(intensity))

    # ------------------------------------------------------------------ plain data

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["intensity"] = [None if s is None else asdict(s) for s in self.intensity]
        return json.loads(json.dumps(d))  # tuples -> lists: JSON- and weights_only-safe

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DatasetDescription":
        try:
            return cls(name=d["name"], layout=d["layout"],
                       channels=tuple(Channel(**c) for c in d["channels"]),
                       label_values=d["label_values"], label_names=d["label_names"],
                       evaluation=[(t["name"], t["labels"]) for t in d["evaluation"]],
                       regions=[(t["name"], t["labels"]) for t in d.get("regions", [])],
                       regions_class_order=d.get("regions_class_order", []),
                       label_aliases=d.get("label_aliases", []), file_ending=d.get("file_ending", ".nii.gz"),
                       spacing=d.get("spacing"),
                       intensity=[None if s is None else IntensityStats(**s) for s in d.get("intensity", [])])
        except (KeyError, TypeError) as e:
            raise ValueError(f"data set description: malformed ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------- the three layouts

def brats_description(modalities: Sequence[str] = BRATS_MODALITIES) -> DatasetDescription:
    """BraTS2023: the given MRI modalities (file suffixes), labels 0..3, scored on WT/TC/ET."""
    if not modalities:
        raise ValueError("modalities: expected at least one modality name, got an empty list")
    return DatasetDescription(
        name="BraTS2023", layout="brats", channels=tuple(Channel(m, m, "zscore") for m in modalities),
        label_values=(0, 1, 2, 3), label_names=BRATS_LABEL_NAMES,
        evaluation=tuple(BRATS_REGIONS.items()), label_aliases=((4, 3),))


def _norm_of(channel_name: str) -> str:
    """nnU-Net's mapping of channel names to normalisation schemes (case-insensitive)."""
    n = channel_name.strip().lower()
    if n == "rgb_to_0_1":
        raise ValueError("channel_names: 'rgb_to_0_1' (2D RGB images) is not supported; 3D volumes only")
    return {"ct": "ct", "nonorm": "none", "rescale_to_0_1": "rescale"}.get(n, "zscore")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: expected an integer label value, got {value!r}")
    return value


def _channel_ids(raw: Any, what: str) -> list[tuple[int, str]]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{what}: expected a non-empty object mapping channel numbers to names, got {raw!r}")
    try:
        ids = sorted((int(k), str(v)) for k, v in raw.items())
    except ValueError:
        raise ValueError(f"{what}: keys must be channel numbers \"0\", \"1\", ..., got {list(raw)}") from None
    if [i for i, _ in ids] != list(range(len(ids))):
        raise ValueError(f"{what}: expected channels numbered 0..{len(ids) - 1}, got {[i for i, _ in ids]}")
    return ids


def nnunet_description(meta: Mapping[str, Any], name: str = "dataset") -> DatasetDescription:
    """Description of an nnU-Net v2 raw data set from its dataset.json contents."""
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in meta:
            raise ValueError(f"dataset.json: missing {key!r} (nnU-Net v2 needs channel_names, labels, "
                             f"numTraining and file_ending)")
    channels = tuple(Channel(n, f"{i:04d}", _norm_of(n)) for i, n in _channel_ids(meta["channel_names"],
                                                                                   "dataset.json: channel_names"))
    labels = meta["labels"]
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"dataset.json: labels: expected an object mapping names to values, got {labels!r}")
    if "ignore" in labels:
        raise ValueError("dataset.json: labels: the 'ignore' label (sparse annotation) is not supported")
    regions: list[tuple[str, tuple[int, ...]]] = []
    named: dict[int, str] = {}
    region_based = any(isinstance(v, (list, tuple)) for v in labels.values())
    for lname, value in labels.items():
        what = f"dataset.json: labels: {lname!r}"
        if isinstance(value, (list, tuple)):
            ints = tuple(sorted({_int(v, what) for v in value}))
        else:
            ints = (_int(value, what),)
            if ints[0] in named:
                raise ValueError(f"{what}: value {ints[0]} is already named {named[ints[0]]!r}")
            named[ints[0]] = lname
        if any(v < 0 for v in ints):
            raise ValueError(f"{what}: label values must be >= 0, got {list(ints)}")
        if region_based and ints != (0,):
            regions.append((lname, ints))
    if named.get(0) is None:
        raise ValueError("dataset.json: labels: expected a background entry with value 0")
    values = sorted({0, *named, *(v for _, r in regions for v in r)})
    names = tuple(named.get(v, f"label {v}") for v in values)
    order = meta.get("regions_class_order")
    if region_based and order is None:
        raise ValueError("dataset.json: labels define regions (list values) but regions_class_order is missing")
    if not region_based and order is not None:
        raise ValueError("dataset.json: regions_class_order is given but no label is a region (list value)")
    evaluation = regions if region_based else [(n, (v,)) for v, n in zip(values, names) if v != 0]
    return DatasetDescription(name=str(meta.get("name", name)), layout="nnunet", channels=channels,
                              label_values=values, label_names=names, evaluation=evaluation, regions=regions,
                              regions_class_order=order or (), file_ending=str(meta["file_ending"]))


def msd_description(meta: Mapping[str, Any], name: str = "task") -> DatasetDescription:
    """Description of a Medical Segmentation Decathlon task from its dataset.json contents."""
    for key in ("modality", "labels", "training"):
        if key not in meta:
            raise ValueError(f"dataset.json: missing {key!r} (a Decathlon task needs modality, labels, training)")
    channels = tuple(Channel(n, str(i), "ct" if n.strip().lower() == "ct" else "zscore")
                     for i, n in _channel_ids(meta["modality"], "dataset.json: modality"))
    labels = meta["labels"]
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"dataset.json: labels: expected an object mapping values to names, got {labels!r}")
    try:
        pairs = sorted((int(k), str(v)) for k, v in labels.items())
    except ValueError:
        raise ValueError(f"dataset.json: labels: keys must be label values \"0\", \"1\", ..., got {list(labels)}") from None
    values, names = [v for v, _ in pairs], [n for _, n in pairs]
    return DatasetDescription(name=str(meta.get("name", name)), layout="msd", channels=channels,
                              label_values=values, label_names=names,
                              evaluation=[(n, (v,)) for v, n in pairs if v != 0])


def read_dataset_json(root: str | Path) -> tuple[DatasetDescription, dict[str, Any]]:
    """The description of the data set whose dataset.json is in `root`, and the raw JSON.

    nnU-Net v2 is recognised by ``channel_names``, a Decathlon task (or nnU-Net v1 task) by
    ``modality`` with a ``training`` list.
    """
    path = Path(root) / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        if "channel_names" in meta:
            return nnunet_description(meta, Path(root).name), meta
        if "modality" in meta and "training" in meta:
            return msd_description(meta, Path(root).name), meta
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    raise ValueError(f"{path}: neither an nnU-Net v2 dataset.json (channel_names, labels, numTraining, "
                     f"file_ending) nor a Decathlon one (modality, labels, training)")
