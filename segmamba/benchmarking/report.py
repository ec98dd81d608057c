"""The comparison's outputs: a Markdown table with the machine it ran on, and a PNG plot."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from .cases import Result

REFERENCE_MODEL = "segmamba"
IN_OUT = "4 input channels, 4 output labels"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, str]:
    """Where and with what the numbers were measured (goes into the table's header)."""
    try:
        import monai

        monai_version = monai.__version__
    except ImportError:
        monai_version = "not installed"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        machine = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        machine = f"{_cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai_version,
    }
    try:
        from segmamba_kernels.dispatch import cpu_isa_level

        from .cases import scan_backend

        backend = scan_backend(device)
        info["kernel backend"] = f"{backend} (ISA {cpu_isa_level()})" if backend == "cpu" else backend
    except Exception as e:  # the table is still worth writing when the kernel library is broken
        info["kernel backend"] = f"unknown ({type(e).__name__}: {e})"
    if device == "cpu":
        from segmamba.cpu_threads import WAIT_POLICY_NOTE

        # The measuring processes inherit a passive choice; otherwise each makes its own (quiet: default).
        info["this process's OpenMP wait policy"] = WAIT_POLICY_NOTE.removeprefix("OpenMP wait policy: ")
    return info


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"
    except OSError:
        return "unknown"


# A 1-minute load average above this at the start means other processes were running: times taken
# then are not comparable with a quiet machine's (a measurement process itself adds about 1 later).
BUSY_LOAD = 0.5


def busy_warning() -> str | None:
    """A warning for the table header and stderr when the machine is busy now, else None."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if load <= BUSY_LOAD:
        return None
    return (f"the machine was busy at the start (1-minute load average {load:.2f} > {BUSY_LOAD}): other processes "
            f"competed for the CPUs, so times are unreliable; re-run on a quiet machine")


NOTE_WIDTH = 40  # longer notes go below the table, keyed by a footnote number


def _cell_time(r: Result | None, notes: list[str]) -> str:
    if r is None:
        return "-"
    if r.status == "ok":
        return f"{r.median_s:.3f}"
    text = f"{r.status}: {r.note}" if r.note else r.status
    if len(text) <= NOTE_WIDTH:
        return text
    if text not in notes:
        notes.append(text)
    return f"{r.status} [{notes.index(text) + 1}]"


def _cell_mem(r: Result | None) -> str:
    return f"{r.peak_mb:,.0f}" if r is not None and r.status == "ok" else "-"


def _index(results: Sequence[Result]) -> dict[tuple[str, int, str], Result]:
    return {(r.case.model, r.case.crop, r.case.mode): r for r in results}


def _ordered_keys(results: Sequence[Result]) -> tuple[list[str], list[int]]:
    models = list(dict.fromkeys(r.case.model for r in results))
    crops = sorted({r.case.crop for r in results})
    return models, crops


def markdown_table(results: Sequence[Result], meta: dict[str, str]) -> str:
    """The comparison as Markdown: header facts, one row per (model, crop), ratios to SegMamba."""
    idx = _index(results)
    models, crops = _ordered_keys(results)
    first = results[0].case
    mem_kind = ("CUDA max allocated (weights, optimiser state, activations)" if first.device == "cuda"
                else "peak resident memory of a fresh process per case (interpreter and libraries included)")
    lines = [f"# Model comparison on {first.device.upper()}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        f"- batch {first.batch}, {IN_OUT}, median of up to {first.repeats} timed steps after {first.warmup} warm-up"
        + (" (tiny configurations: quick mode)" if first.tiny else ""),
        "- train step = forward + cross-entropy + backward + SGD step; peak MB = " + mem_kind,
        f"- every model alike: memory format {'channels-last 3D' if first.channels_last else 'contiguous (NCDHW)'}, "
        f"torch.compile {'on (default mode)' if first.compile else 'off'}",
        "",
        "| model | crop | params (M) | inference s | train step s | peak MB inference | peak MB train |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes: list[str] = []
    for crop in crops:
        for model in models:
            inf, tr = idx.get((model, crop, "infer")), idx.get((model, crop, "train"))
            if inf is None and tr is None:
                continue
            params = next((r.params for r in (inf, tr) if r is not None and r.params), None)
            p = f"{params / 1e6:.2f}" if params else "-"
            lines.append(f"| {model} | {crop}³ | {p} | {_cell_time(inf, notes)} | {_cell_time(tr, notes)} | "
                         f"{_cell_mem(inf)} | {_cell_mem(tr)} |")
    lines += [""] + [f"- [{i}] {n}" for i, n in enumerate(notes, 1)] + ([""] if notes else [])
    if first.compile:
        firsts = [f"{r.case.model} {r.case.crop}³ {r.case.mode} {r.first_s:.0f} s" for r in results
                  if r.status == "ok" and r.first_s is not None]
        lines += ["First (warm-up) step, compilation included: " + "; ".join(firsts) + ".", ""]
    lines += _ratio_lines(idx, models, crops)
    return "\n".join(lines).rstrip() + "\n"


def _ratio(a: Result | None, b: Result | None, attr: str) -> str:
    if a is None or b is None or a.status != "ok" or b.status != "ok":
        return "-"
    va, vb = (a.median_s, b.median_s) if attr == "time" else (a.peak_mb, b.peak_mb)
    return f"{va / vb:.2f}"


def _ratio_lines(idx: dict, models: list[str], crops: list[int]) -> list[str]:
    if REFERENCE_MODEL not in models or len(models) < 2:
        return []
    out = ["SegMamba relative to each baseline (SegMamba / baseline; < 1 means SegMamba is faster or smaller):", "",
           "| baseline | crop | inference time | train-step time | peak MB train |", "| --- | --- | ---: | ---: | ---: |"]
    for crop in crops:
        ref = {m: idx.get((REFERENCE_MODEL, crop, m)) for m in ("infer", "train")}
        for model in models:
            if model == REFERENCE_MODEL:
                continue
            other = {m: idx.get((model, crop, m)) for m in ("infer", "train")}
            out.append(f"| {model} | {crop}³ | {_ratio(ref['infer'], other['infer'], 'time')} | "
                       f"{_ratio(ref['train'], other['train'], 'time')} | {_ratio(ref['train'], other['train'], 'mem')} |")
    return out


def write_plot(results: Sequence[Result], path: Path) -> None:
    """Inference time, train-step time and train peak memory against crop side, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = _index(results)
    models, crops = _ordered_keys(results)
    panels = [("infer", "time", "inference (s)"), ("train", "time", "train step (s)"), ("train", "mem", "peak MB, train")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), constrained_layout=True)
    for ax, (mode, what, label) in zip(axes, panels):
        for model in models:
            pts = [(c, r.median_s if what == "time" else r.peak_mb) for c in crops
                   if (r := idx.get((model, c, mode))) is not None and r.status == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=model)
        ax.set_xlabel("crop side (voxels)")
        ax.set_ylabel(label)
        ax.set_xticks(crops)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    first = results[0].case
    fig.suptitle(f"{first.device.upper()}, batch {first.batch}")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(results: Sequence[Result], meta: dict[str, str], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write `<stem>.md` and `<stem>.png` into `out_dir`; returns their paths."""
    if not results:
        raise ValueError("results: expected at least one measured case, got none")
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png = out_dir / f"{stem}.md", out_dir / f"{stem}.png"
    md.write_text(markdown_table(results, meta) + f"\n![time and memory vs crop]({png.name})\n")
    write_plot(results, png)
    return md, png
