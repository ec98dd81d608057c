"""Where a training step's time goes: per module (forward and backward) and per kind of operation.

One profiled step (torch.profiler) gives both. Forward hooks open a `module::<path>` range around
each module's forward, which is its forward time. Every op that runs inside a range carries the
sequence number of the autograd node it creates; the backward's `evaluate_function` events carry
the same numbers, so each backward node's time is charged to the innermost module whose forward
created it, and to that module's ancestors. (Timing the interval between a module's output and
input gradients does not work for U-Nets: the engine runs ready nodes by creation order, so a skip
branch's backward waits, interleaved with other levels.) Backward time that no module created
(the loss, gradient accumulation) and the optimiser step form the rest.

Op kinds: the profiler's self time per op, grouped (selective scan, causal conv1d, 3D convolution,
matrix products, normalisation, layout copies, elementwise). On CUDA these are device times; module
times are host times there, so profile on CPU, or read them as launch order only.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .cases import Case, build, prepare

MODULE_PREFIX = "module::"
BACKWARD_PREFIX = "autograd::engine::evaluate_function"


class ModuleRanges:
    """Forward hooks that open a profiler range `module::<path>` around every module with fewer than `depth` dots + 1 parts."""

    def __init__(self, model: torch.nn.Module, depth: int) -> None:
        # ModuleList/ModuleDict are never called: their members are, and get ranges of their own.
        self.order = [n for n, m in model.named_modules() if n and n.count(".") < depth
                      and not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict))]
        self._open: dict[str, list[record_function]] = defaultdict(list)
        self._handles = []
        for name in self.order:
            mod = model.get_submodule(name)
            self._handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self._handles.append(mod.register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(mod, args):
            rf = record_function(MODULE_PREFIX + name)
            rf.__enter__()
            self._open[name].append(rf)
        return hook

    def _post(self, name: str):
        def hook(mod, args, out):
            self._open[name].pop().__exit__(None, None, None)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _innermost(evt, prefix: str):
    """The closest ancestor of `evt` (itself included) whose name starts with `prefix`, or None."""
    while evt is not None and not evt.name.startswith(prefix):
        evt = evt.cpu_parent
    return evt


def _outermost(evt, prefix: str):
    """The furthest ancestor of `evt` (itself included) whose name starts with `prefix`, or None."""
    found = None
    while evt is not None:
        if evt.name.startswith(prefix):
            found = evt
        evt = evt.cpu_parent
    return found


def owners(events) -> dict[int, str]:
    """Autograd sequence number -> path of the innermost module whose forward created that node."""
    owner: dict[int, str] = {}
    for e in events:
        if (e.sequence_nr >= 0 and e.sequence_nr not in owner
                and not e.name.startswith((MODULE_PREFIX, BACKWARD_PREFIX))):
            mod = _innermost(e, MODULE_PREFIX)
            if mod is not None:
                owner[e.sequence_nr] = mod.name[len(MODULE_PREFIX):]
    return owner


def attribute(events, names: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(forward seconds, backward seconds) per module path from a profiler's `events()`."""
    fwd: dict[str, float] = defaultdict(float)
    bwd: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith(MODULE_PREFIX):
            fwd[e.name[len(MODULE_PREFIX):]] += e.cpu_time_total / 1e6
    owner = owners(events)
    known = set(names)
    for e in events:
        # Top-level backward nodes only: a custom op's backward may run a nested backward inside.
        if (e.name.startswith(BACKWARD_PREFIX) and e.sequence_nr in owner
                and _innermost(e.cpu_parent, BACKWARD_PREFIX) is None):
            path = owner[e.sequence_nr]
            parts = path.split(".")
            for i in range(1, len(parts) + 1):
                if ".".join(parts[:i]) in known:
                    bwd[".".join(parts[:i])] += e.cpu_time_total / 1e6
    return dict(fwd), dict(bwd)


LAYOUT_COPIES = "layout copies (copy_/flip/clone: scan orders, memory formats, contiguous)"
# Goal for the layout copies' share of a training step's op time once the kernels walk the scan orders.
LAYOUT_GOAL_PCT = 2.0

# Profiler op name -> kind; the first matching substring wins, so specific names come first.
OP_KINDS: tuple[tuple[str, str], ...] = (
    ("selective_scan", "selective scan (ToM)"),
    ("causal_conv1d", "causal conv1d (ToM)"),
    ("conv", "3D convolution"),
    ("addmm", "matrix products (linear)"),
    ("bmm", "matrix products (linear)"),
    ("mm", "matrix products (linear)"),
    ("linear", "matrix products (linear)"),
    ("norm", "normalisation"),
    ("copy_", LAYOUT_COPIES),
    ("flip", LAYOUT_COPIES),
    ("clone", LAYOUT_COPIES),
    # The decoder's skip concatenation is part of the architecture (every U-Net baseline has it), not
    # a layout change, so it is kept apart from the copies the scan orders and memory formats cost.
    ("cat", "concatenation (decoder skips)"),
    ("sgd", "optimiser"),
    ("_foreach", "optimiser"),
)


def op_kind(name: str) -> str:
    low = name.lower()
    return next((kind for pattern, kind in OP_KINDS if pattern in low), "elementwise and other")


def op_kinds(prof, device: str) -> dict[str, float]:
    """Seconds of self time per op kind (device time on CUDA); the module ranges themselves left out."""
    kinds: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith(MODULE_PREFIX):
            continue
        us = evt.self_device_time_total if device == "cuda" else evt.self_cpu_time_total
        kinds[op_kind(evt.key)] += us / 1e6
    return dict(kinds)


def _pct(x: float, total: float) -> str:
    return f"{100 * x / total:5.1f}%" if total > 0 else "-"


# SegMamba's stages, by module path (docs/design.md §4); other models are summarised by top-level module.
STAGE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"encoder\.downsample\.0", "stem (conv 7^3, stride 2)"),
    (r"encoder\.downsample\.\d+", "downsamplers (IN + conv 2^3)"),
    (r"encoder\.gscs\.\d+", "GSC blocks"),
    (r"encoder\.stages\.\d+", "Mamba layers (LayerNorm + ToM)"),
    (r"encoder\.outputs\.\d+", "skip MLPs (IN + 1x1 convs)"),
    (r"encoder[1-5]|decoder[1-5]|out", "decoder (UNETR blocks + head)"),
)


def stage_totals(order: Sequence[str], fwd: dict[str, float], bwd: dict[str, float]) -> dict[str, list[float]]:
    """label -> [forward s, backward s], each module counted once under the first pattern matching its path."""
    totals: dict[str, list[float]] = {}
    for name in order:
        label = next((lab for pat, lab in STAGE_PATTERNS if re.fullmatch(pat, name)), None)
        if label is not None:
            t = totals.setdefault(label, [0.0, 0.0])
            t[0] += fwd.get(name, 0.0)
            t[1] += bwd.get(name, 0.0)
    if not totals:  # not SegMamba: one stage per top-level module
        totals = {n: [fwd.get(n, 0.0), bwd.get(n, 0.0)] for n in order if "." not in n}
    return totals


def _stage_label(path: str) -> str:
    """The stage of a module path (its own or its nearest ancestor's), else its top-level module."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        label = next((lab for pat, lab in STAGE_PATTERNS if re.fullmatch(pat, prefix)), None)
        if label is not None:
            return label
    return parts[0]


OUTSIDE = "outside the model (loss, optimiser, gradient accumulation)"


def layout_copy_sources(events) -> dict[str, float]:
    """Self seconds of the layout-copy ops per stage, forward and backward together.

    A forward op belongs to the innermost module range around it; an op inside a backward node to
    the module whose forward created that node (the outermost node: a custom op's backward may run
    a nested backward).
    """
    owner = owners(events)
    out: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith(MODULE_PREFIX) or op_kind(e.name) != LAYOUT_COPIES:
            continue
        mod = _innermost(e, MODULE_PREFIX)
        if mod is not None:
            path = mod.name[len(MODULE_PREFIX):]
        else:
            node = _outermost(e, BACKWARD_PREFIX)
            path = owner.get(node.sequence_nr) if node is not None else None
        out[_stage_label(path) if path else OUTSIDE] += e.self_cpu_time_total / 1e6
    return dict(out)


def profile_model(model_name: str, crop: int, device: str, batch: int, tiny: bool = False, depth: int = 3,
                  channels_last: bool = False) -> str:
    """Markdown: per-stage, per-module and per-op-kind breakdown of one training step of `model_name`."""
    case = Case(model_name, crop, "train", device, batch, repeats=1, tiny=tiny, channels_last=channels_last)
    torch.manual_seed(0)
    model = build(case)
    step = prepare(case, model)
    start = time.perf_counter()
    step()  # warm-up: one-off allocations and kernel selection stay out of the numbers
    plain = time.perf_counter() - start
    ranges = ModuleRanges(model, depth)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start
    ranges.remove()
    events = prof.events()
    fwd, bwd = attribute(events, ranges.order)
    kinds = op_kinds(prof, device)
    ktotal = sum(kinds.values())
    copies = kinds.get(LAYOUT_COPIES, 0.0)
    pct = 100 * copies / ktotal if ktotal > 0 else 0.0
    layout = ", channels-last 3D" if channels_last else ""
    lines = [f"## {model_name}, train step at {crop}³, batch {batch}, {device}{layout}: {total:.3f} s profiled "
             f"(warm-up step {plain:.3f} s unprofiled)", "",
             f"**Layout copies: {pct:.1f}% of the step's op time ({copies:.3f} s; goal < {LAYOUT_GOAL_PCT:g}%: "
             f"{'met' if pct < LAYOUT_GOAL_PCT else 'not met'})**; where they are: the last table.", "",
             "### Stages", "", "| stage | forward s | backward s | share of step |", "| --- | ---: | ---: | ---: |"]
    stages = stage_totals(ranges.order, fwd, bwd)
    for label, (f, b) in stages.items():
        lines.append(f"| {label} | {f:.3f} | {b:.3f} | {_pct(f + b, total)} |")
    rest = total - sum(f + b for f, b in stages.values())
    lines += [f"| loss, gradient accumulation, optimiser | | | {_pct(rest, total)} |", "",
              "### Modules (nested: a parent includes its children; >= 1% of the step)", "",
              "| module | forward s | backward s | share of step |", "| --- | ---: | ---: | ---: |"]
    for name in ranges.order:
        f, b = fwd.get(name, 0.0), bwd.get(name, 0.0)
        if f + b >= 0.01 * total:
            indent = "&nbsp;&nbsp;" * name.count(".")
            lines.append(f"| {indent}{name} ({type(model.get_submodule(name)).__name__}) | {f:.3f} | {b:.3f} | "
                         f"{_pct(f + b, total)} |")
    lines += ["", f"### Operation kinds ({'device' if device == 'cuda' else 'CPU'} self time, same step)", "",
              "| kind | seconds | share |", "| --- | ---: | ---: |"]
    for kind, sec in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {sec:.3f} | {_pct(sec, ktotal)} |")
    if device == "cpu":  # CPU self times of ops: on CUDA the copies' host-side share would mislead
        sources = layout_copy_sources(events)
        lines += ["", "### Layout copies by stage (forward and backward)", "",
                  "| stage | seconds | share of the step's op time |", "| --- | ---: | ---: |"]
        for label, sec in sorted(sources.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {label} | {sec:.3f} | {_pct(sec, ktotal)} |")
    return "\n".join(lines) + "\n"


def profile_report(models: Sequence[str], crops: Sequence[int], device: str, batch: int, tiny: bool = False,
                   channels_last: bool = False) -> str:
    from .report import busy_warning, load_average, machine_info

    meta = machine_info(device)
    head = ["# Training-step profile", ""] + [f"- {k}: {v}" for k, v in meta.items()]
    head += [f"- load average (1/5/15 min): {load_average()}"]
    warning = busy_warning()
    head += [f"- **WARNING**: {warning}", ""] if warning else [""]
    return "\n".join(head) + "\n" + "\n".join(profile_model(m, c, device, batch, tiny, channels_last=channels_last)
                                              for c in crops for m in models)
