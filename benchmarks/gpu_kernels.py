"""Time every selective-scan and causal-conv1d backend against the memory bandwidth of this device.

    python benchmarks/gpu_kernels.py --out results.md            # GPU: batch 2, dim 96, N 16, L = 64^3, 32^3, 16^3
    python benchmarks/gpu_kernels.py --quick --device cpu        # tiny shapes on CPU (tests/test_bench.py runs this)
    python benchmarks/gpu_kernels.py --orders forward reverse inter_slice --deterministic-too --out o.md

Backends: `cuda` (when built) and `triton` on a GPU, `cpu` (when built) on CPU (never Triton's
interpreter); `reference` (pure PyTorch, sequential over L) only where L <= --ref-max-len.
Each op runs in the configuration SegMamba uses (D, z gate, delta_bias, softplus; conv width 4,
bias, SiLU), in fp32 and bf16, forward and forward+backward, in each scan order asked for
(`--orders`; inter_slice with side slices of L = side^3) and, with `--deterministic-too`,
forward+backward once more with the deterministic backward (`torch.use_deterministic_algorithms`).
Rows run forward order first, then the other orders, then the deterministic ones, then the
reference, so a `--time-budget` cuts the least important first. Timing: CUDA events (host clock on
CPU) around each call after warm-up, median of --repeats; inputs rotate among several copies so
that small sizes are not served from L2.

Achieved bandwidth = minimal bytes / median time, against a device-to-device copy of a large tensor
measured in the same run (bytes read + written). Minimal bytes, every input read once and every
output written once; s = bytes per element of the input dtype, b batch, d dim, L length, N state
size, g groups of B/C; the O(d N) parameters (A, D, delta_bias, conv weight) are left out:

    scan forward           s * (4 b d L + 2 b g N L)     read u, delta, z, B, C; write out
    scan backward          s * (7 b d L + 4 b g N L)     read u, delta, z, dout, B, C; write du, ddelta, dz, dB, dC
    conv forward           s * 2 b d L                   read x; write out
    conv backward          s * 3 b d L                   read x, dout; write dx
    "fwd+bwd" rows count forward + backward bytes.

The `rel err` column is ||out - ref|| / ||ref|| of the forward output against the float64 reference
on the same inputs (only where the reference runs).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import segmamba_kernels as sk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROTATE_BYTES = 256 * 2**20  # input copies in rotation per row: several times the H200's 60 MB L2


@dataclass(frozen=True)
class Shape:
    batch: int
    dim: int
    N: int
    L: int
    groups: int = 1


def scan_bytes(s: Shape, elem: int, backward: bool) -> int:
    bd, bgn = s.batch * s.dim * s.L, s.batch * s.groups * s.N * s.L
    fwd = 4 * bd + 2 * bgn
    return elem * (fwd + (7 * bd + 4 * bgn if backward else 0))


def conv_bytes(s: Shape, elem: int, backward: bool) -> int:
    bd = s.batch * s.dim * s.L
    return elem * (2 * bd + (3 * bd if backward else 0))


def scan_inputs(s: Shape, dtype: torch.dtype, device: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    return dict(u=r(s.batch, s.dim, s.L), delta=r(s.batch, s.dim, s.L) * 0.5,
                A=-torch.exp(torch.rand(s.dim, s.N, generator=gen) * 2).to(device),
                B=r(s.batch, s.groups, s.N, s.L), C=r(s.batch, s.groups, s.N, s.L),
                D=r(s.dim, dt=torch.float32), z=r(s.batch, s.dim, s.L), delta_bias=r(s.dim, dt=torch.float32) * 0.1 - 3)


def conv_inputs(s: Shape, dtype: torch.dtype, device: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return dict(x=torch.randn(s.batch, s.dim, s.L, generator=gen).to(device=device, dtype=dtype),
                weight=(torch.randn(s.dim, 4, generator=gen) * 0.5).to(device),
                bias=torch.randn(s.dim, generator=gen).to(device))


ORDERS = ("forward", "reverse", "inter_slice")


def _order(order: str, L: int) -> dict:
    # inter_slice: as SegMamba scans a side^3 volume, side slices of side^2 tokens (for other L,
    # the divisor of L nearest its cube root).
    slices = min((d for d in range(1, L + 1) if L % d == 0), key=lambda d: abs(d - L ** (1 / 3)))
    return dict(order=order, n_slices=slices if order == "inter_slice" else 1)


def run_scan(x: dict, backend: str, order: str) -> torch.Tensor:
    return sk.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                             delta_softplus=True, backend=backend, **_order(order, x["u"].shape[-1]))


def run_conv(x: dict, backend: str, order: str) -> torch.Tensor:
    return sk.causal_conv1d(x["x"], x["weight"], x["bias"], activation="silu", backend=backend,
                            **_order(order, x["x"].shape[-1]))


OPS: dict[str, tuple[Callable, Callable, Callable]] = {
    "selective_scan": (scan_inputs, run_scan, scan_bytes),
    "causal_conv1d": (conv_inputs, run_conv, conv_bytes),
}


def median_seconds(fn: Callable[[int], None], device: str, warmup: int, repeats: int) -> float:
    """Median wall time of fn(i) for i = 0..repeats-1, after `warmup` untimed calls."""
    for i in range(warmup):
        fn(i)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for i in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int, warmup: int, repeats: int) -> float:
    """GB/s of a device-to-device copy of `nbytes`, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    sec = median_seconds(lambda i: dst.copy_(src), device, warmup, repeats)
    return 2 * src.numel() * 4 / sec / 1e9


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def backends_for(device: str) -> list[str]:
    """The fast backends usable on `device`; on CPU not Triton's interpreter, which is for tests, not timing."""
    status = sk.backend_status()
    return [b for b in (("cuda", "triton") if device == "cuda" else ("cpu",)) if status[b][0]]


def measure_row(op: str, shape: Shape, dtype: torch.dtype, backend: str, backward: bool, device: str,
                warmup: int, repeats: int, order: str = "forward",
                deterministic: bool = False) -> tuple[float, int, float | None]:
    """(median seconds, minimal bytes, rel err of the forward vs float64 reference or None)."""
    make, run, nbytes = OPS[op]
    gen = torch.Generator().manual_seed(0)
    elem = torch.tensor([], dtype=dtype).element_size()
    row_bytes = nbytes(shape, elem, backward)
    sets = [make(shape, dtype, device, gen) for _ in range(max(1, min(8, math.ceil(ROTATE_BYTES / row_bytes))))]
    if device == "cpu":
        sets = sets[:1]  # caches are not the question on CPU, memory is
    err = None
    if not backward and backend != "reference":
        ref = (run({k: v.double() for k, v in sets[0].items()}, "reference", order)
               if shape.L <= 4096 or device == "cpu" else None)
        err = rel_err(run(sets[0], backend, order), ref) if ref is not None else None
    if backward:
        for x in sets:
            for t in x.values():
                t.requires_grad_(True)
        dout = torch.randn(shape.batch, shape.dim, shape.L, generator=gen).to(device=device, dtype=dtype)

        def fn(i: int) -> None:
            x = sets[i % len(sets)]
            for t in x.values():
                t.grad = None
            run(x, backend, order).backward(dout)
    else:
        def fn(i: int) -> None:
            with torch.no_grad():
                run(sets[i % len(sets)], backend, order)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        return median_seconds(fn, device, warmup, repeats), row_bytes, err
    finally:
        torch.use_deterministic_algorithms(was)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes (batch 2, dim 8, N 4, L 64 and 257)")
    p.add_argument("--sides", type=int, nargs="+", default=[64, 32, 16], help="L = side^3 (not with --quick)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    p.add_argument("--orders", nargs="+", choices=ORDERS, default=["forward"], help="scan orders (default forward)")
    p.add_argument("--deterministic-too", action="store_true",
                   help="also time forward+backward with the deterministic backward")
    p.add_argument("--ref-max-len", type=int, default=4096, help="longest L the slow reference backend is timed at")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; later rows are skipped past it")
    p.add_argument("--out", type=Path, help="also write the table (Markdown) here, rewritten after every row")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu)")
    if args.quick:
        shapes = [Shape(2, 8, 4, 64), Shape(2, 8, 4, 257)]
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 3)
    else:
        shapes = [Shape(2, 96, 16, side ** 3) for side in args.sides]
    copy_gbs = copy_bandwidth(args.device, 2**30 if args.device == "cuda" else 64 * 2**20, args.warmup, args.repeats)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    header = [f"# Kernel timings on {where}", "",
              f"torch {torch.__version__}, backends {backends_for(args.device)}, median of {args.repeats} after {args.warmup} warm-up",
              f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)", "",
              "| op | dtype | L | order | backend | pass | median ms | GB/s | % of copy | rel err |",
              "| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    rows: list[str] = []

    def emit(row: str) -> None:
        rows.append(row)
        print(row, flush=True)
        if args.out:
            args.out.write_text("\n".join(header + rows) + "\n")

    print("\n".join(header), flush=True)
    fast = backends_for(args.device)
    passes = [(False, False), (True, False)] + ([(True, True)] if args.deterministic_too else [])
    plan = [(op, shape, dname, order, backend, backward, det) for op in args.ops for shape in shapes
            for dname in args.dtypes for order in args.orders
            for backend in fast + (["reference"] if shape.L <= args.ref_max_len else [])
            for backward, det in passes if not (det and backend == "reference")]
    # The budget cuts from the end: the slow reference last, before it the deterministic rows, then
    # the other orders; the default configuration first.
    plan.sort(key=lambda row: (row[4] == "reference", row[6], row[3] != "forward"))
    started = time.perf_counter()
    for op, shape, dname, order, backend, backward, det in plan:
        pass_name = ("fwd+bwd det" if det else "fwd+bwd") if backward else "fwd"
        label = f"| {op} | {dname} | {shape.L} | {order} | {backend} | {pass_name} |"
        if time.perf_counter() - started > args.time_budget:
            emit(f"{label} skipped: time budget | | | |")
            continue
        warmup, reps = (args.warmup, args.repeats) if backend != "reference" else (1, min(args.repeats, 3))
        try:
            sec, nbytes, err = measure_row(op, shape, DTYPES[dname], backend, backward, args.device, warmup, reps,
                                           order, det)
        except Exception as e:  # one failing backend must not hide the others' numbers
            emit(f"{label} error: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | |")
            continue
        gbs = nbytes / sec / 1e9
        emit(f"{label} {sec * 1e3:.4g} | {gbs:.4g} | {100 * gbs / copy_gbs:.3g}% | "
             f"{'-' if err is None else f'{err:.1e}'} |")
    failed = sum("error:" in r for r in rows)
    print(f"{len(rows)} rows, {failed} failed, {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
