"""Write benchmarks/TRITON_RESOURCES.md: registers, spills and shared memory of every Triton kernel.

    python benchmarks/triton_resources.py [--workers 2] [--out benchmarks/TRITON_RESOURCES.md]

Compiles the full matrix of ``segmamba_kernels.triton.aot`` (every kernel x autotune config x
dtype x constexpr variant x sm_80/sm_90; about 2000 compiles, ~30 min of CPU, cached by triton
in ~/.triton/cache afterwards) without a GPU, and tabulates one row per kernel, config, dtype
and target with the worst value over its variants. Run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from collections import defaultdict

import triton

from segmamba_kernels.triton import aot

HERE = os.path.dirname(os.path.abspath(__file__))


def _variant(flags: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in flags)


def table(results: list[aot.Result]) -> list[str]:
    groups: dict[tuple, list[aot.Result]] = defaultdict(list)
    for r in results:
        groups[r.job.op, r.job.config, r.job.dtype, r.job.arch].append(r)
    lines = ["| kernel | config | dtype | arch | variants | registers (min..max) | max spill STL / LDL | "
             "spilling variants | max smem (B) | heaviest variant |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    dtypes = list(aot.DTYPES)
    for key in sorted(groups, key=lambda k: (list(aot.FLAGS).index(k[0]), k[1], dtypes.index(k[2]), k[3])):
        rs = groups[key]
        ok = [r for r in rs if not r.error]
        heavy = max(ok, key=lambda r: r.registers) if ok else rs[0]
        errors = len(rs) - len(ok)
        spilling = sum(1 for r in ok if r.spill_stores or r.spill_loads)
        lines.append(
            f"| `{key[0]}` | {rs[0].block} | {key[2]} | sm_{key[3]} | {len(rs)}"
            f"{f' ({errors} failed)' if errors else ''} | "
            f"{min(r.registers for r in ok)}..{heavy.registers} | "
            f"{max(r.spill_stores for r in ok)} / {max(r.spill_loads for r in ok)} | {spilling} | "
            f"{max(r.shared for r in ok)} | {_variant(heavy.job.flags)} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "TRITON_RESOURCES.md"))
    a = p.parse_args()
    if aot.INTERPRET:
        sys.exit("unset TRITON_INTERPRET first")
    results = aot.run("full", a.workers)
    problems = [(r, m) for r in results for m in r.problems]
    spills = {d: sum(1 for r in results if r.job.dtype == d and (r.spill_stores or r.spill_loads)) for d in aot.DTYPES}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = f"""# Triton backend: compiled resources per kernel

Generated {now} by `python benchmarks/triton_resources.py` (triton {triton.__version__}, its bundled
ptxas, {platform.machine()}, no GPU): every kernel compiled with `triton.compile` for sm_80 and sm_90
exactly as a launch at a SegMamba shape (batch 2, d_inner 96, L = 64^3, N 16, one B/C group;
16-byte aligned pointers, ints divisible by 16) specialises it, in every autotune config, dtype
(fp32 / bf16 / fp16 / fp64 I/O; compute in fp32, fp64 for fp64) and constexpr variant:
scan: z / no z, softplus / not, order forward / reverse / inter-slice (64 slices), and for the
backward deterministic / float-atomic dB, dC; conv: width 2 / 3 / 4, SiLU / none, the three
orders. Each row is the worst over its variants.

- Registers from `cuobjdump --dump-resource-usage`; spills are the STL / LDL (local memory store /
  load) instructions in the SASS (the resource dump shows 0 local bytes for some spills).
- Shared memory is triton's dynamic allocation (`metadata.shared`); limits 163 KiB (sm_80) and
  227 KiB (sm_90) per block. The CI check (`tests/test_triton_compile.py`) compiles every config of
  every kernel on both targets in the heaviest variant, fp32 and bf16, and fails on a compile
  error, shared memory over the limit, or a spill.

Summary: {len(results)} compiles, {sum(1 for r in results if r.error)} compile errors;
compiles with a spill: fp32 {spills['fp32']}, bf16 {spills['bf16']}, fp16 {spills['fp16']}, fp64 {spills['fp64']}
(fp64 is allowed to spill); max shared memory {max(r.shared for r in results if not r.error)} B.
"""
    body = table(results)
    tail = ["", f"Problems ({len(problems)}):"] + [f"- {r.job.op} {r.job.dtype} sm_{r.job.arch} {r.block} "
                                                  f"{_variant(r.job.flags)}: {m}" for r, m in problems]
    with open(a.out, "w") as f:
        f.write(head + "\n" + "\n".join(body) + "\n" + "\n".join(tail if problems else []) + "\n")
    print(f"wrote {a.out}: {len(results)} compiles, {len(problems)} problems")


if __name__ == "__main__":
    main()
