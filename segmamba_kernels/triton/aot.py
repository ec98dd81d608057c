"""Compile the Triton kernels for real GPU targets without a GPU, and read their resources.

``TRITON_INTERPRET=1`` (how the tests run the kernels here) accepts programs that the
compiler rejects and checks no register or shared-memory limit. This module compiles
every kernel for sm_80 and sm_90 with Triton's own compiler and bundled ptxas, and reads
registers, spills and shared memory from the cubins.

What is compiled is what the host functions launch: they run on meta tensors at a
SegMamba shape (batch 2, d_inner 96, L = 64^3, N 16) inside ``recording_launches``, so
each compile sees a real launch's argument types, specialisations (16-byte aligned
pointers, ints divisible by 16, ints equal to 1 as constants) and constexprs; then every
autotune config of the kernel is compiled.

    python -m segmamba_kernels.triton.aot --matrix ci     # the CI check: exit 1 on a failure
    benchmarks/triton_resources.py                        # the full table (TRITON_RESOURCES.md)

Needs TRITON_INTERPRET unset (the configs compiled are the GPU ones) and no GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from . import conv, scan
from ._common import INTERPRET, recording_launches

# Shared memory per block (opt-in maximum), bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# Where the resource-critical configs must not spill (fp64 may: twice the registers per value).
NO_SPILL_DTYPES = ("fp32", "bf16")
# The orders the ops request (the kernels also take reverse with slices, tested under the interpreter).
ORDERS = {"forward": (False, 1), "reverse": (True, 1), "inter_slice": (False, 64)}
# The flags of each op, each with its values; the first combination is the heaviest variant.
FLAGS = {
    "scan_fwd": {"z": (True, False), "softplus": (True, False), "order": tuple(reversed(ORDERS))},
    "scan_bwd": {"z": (True, False), "softplus": (True, False), "order": tuple(reversed(ORDERS)),
                 "deterministic": (True, False)},
    "conv_fwd": {"width": (4, 3, 2), "silu": (True, False), "order": tuple(reversed(ORDERS))},
    "conv_bwd": {"width": (4, 3, 2), "silu": (True, False), "order": tuple(reversed(ORDERS))},
}
BATCH, DIM, L, N = 2, 96, 64**3, 16


@dataclasses.dataclass(frozen=True)
class Job:
    op: str
    dtype: str
    flags: tuple[tuple[str, Any], ...]
    config: int  # index into the kernel's configs
    arch: int


@dataclasses.dataclass(frozen=True)
class Result:
    job: Job
    block: str  # the config, e.g. "D1 L512 w4"
    registers: int = 0
    spill_stores: int = 0  # STL instructions in the SASS
    spill_loads: int = 0  # LDL instructions
    stack: int = 0  # bytes
    shared: int = 0  # bytes (dynamic, as triton allocates it)
    seconds: float = 0.0
    error: str = ""

    @property
    def problems(self) -> list[str]:
        out = [f"compile error: {self.error}"] if self.error else []
        if self.shared > SMEM_LIMIT[self.job.arch]:
            out.append(f"shared memory {self.shared} B > sm_{self.job.arch} limit {SMEM_LIMIT[self.job.arch]} B")
        if self.job.dtype in NO_SPILL_DTYPES and (self.spill_stores or self.spill_loads):
            out.append(f"spills ({self.spill_stores} STL, {self.spill_loads} LDL)")
        return out


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def record_launch(op: str, dtype: str, flags: dict) -> tuple[Any, tuple, dict]:
    """(autotuned kernel, args, kwargs) of the one launch the host function makes for ``op``."""
    io = DTYPES[dtype]
    cdt = torch.float64 if io == torch.float64 else torch.float32
    reverse, slices = ORDERS[flags["order"]]
    with recording_launches() as launches:
        if op.startswith("scan"):
            u = _meta(BATCH, DIM, L, dtype=io)
            bc = _meta(BATCH, 1, N, L, dtype=io)
            vec = _meta(DIM, dtype=cdt)
            args = (u, u, _meta(DIM, N, dtype=cdt), bc, bc, vec, u if flags["z"] else None, vec, flags["softplus"])
            if op == "scan_fwd":
                scan.selective_scan_fwd(*args, reverse=reverse, slices=slices)
            else:
                scan.selective_scan_bwd(*args, u, reverse=reverse, slices=slices,
                                        deterministic=flags["deterministic"])
        else:
            x = _meta(BATCH, DIM, L, dtype=io)
            args = (x, _meta(DIM, flags["width"], dtype=cdt), _meta(DIM, dtype=cdt), flags["silu"])
            if op == "conv_fwd":
                conv.causal_conv1d_fwd(*args, reverse=reverse, slices=slices)
            else:
                conv.causal_conv1d_bwd(*args, x, reverse=reverse, slices=slices)
    (kernel, _grid, args, kwargs), = launches
    return kernel, args, kwargs


def kernel_configs(op: str) -> list[triton.Config]:
    return {"scan_fwd": scan.FWD_CONFIGS, "scan_bwd": scan.BWD_CONFIGS,
            "conv_fwd": conv.CONFIGS, "conv_bwd": conv.CONFIGS}[op]


def describe(config: triton.Config) -> str:
    return f"D{config.kwargs['BLOCK_D']} L{config.kwargs['BLOCK_L']} w{config.num_warps}"


def ast_source(kernel: Any, args: tuple, kwargs: dict, config: triton.Config) -> ASTSource:
    """The source a launch with ``config`` would compile, specialised as triton's JIT does."""
    fn = kernel.fn
    bound = {**dict(zip(fn.arg_names, args)), **kwargs, **config.kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = spec
        else:
            attrs[(i,)] = BaseBackend.parse_attr(spec or "")
    return ASTSource(fn, signature, constexprs, attrs)


def _tool(name: str) -> str:
    for path in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name),
                 os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)):
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{name} not found in CUDA_HOME/bin or triton's bundled tools")


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """Registers and stack from ``cuobjdump --dump-resource-usage``; spill stores / loads as the
    STL / LDL instructions of the SASS (the resource dump does not show every spill)."""
    cuobjdump = _tool("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK):(\d+)", usage))
    return dict(registers=int(fields["REG"]), stack=int(fields["STACK"]),
                spill_stores=len(re.findall(r"\bSTL(?:\.\w+)*\s", sass)),
                spill_loads=len(re.findall(r"\bLDL(?:\.\w+)*\s", sass)))


def compile_job(job: Job) -> Result:
    config = kernel_configs(job.op)[job.config]
    start = time.perf_counter()
    try:
        kernel, args, kwargs = record_launch(job.op, job.dtype, dict(job.flags))
        compiled = triton.compile(ast_source(kernel, args, kwargs, config), target=GPUTarget("cuda", job.arch, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages,
                                               num_ctas=config.num_ctas, maxnreg=config.maxnreg))
        res = cubin_resources(compiled.asm["cubin"])
        return Result(job, describe(config), shared=compiled.metadata.shared,
                      seconds=time.perf_counter() - start, **res)
    except Exception as e:  # a compile error is a result to report, not a crash of the survey
        return Result(job, describe(config), seconds=time.perf_counter() - start,
                      error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")


def jobs(matrix: str) -> Iterator[Job]:
    """``full``: every dtype x flag combination x config x arch. ``ci``: every config of every
    kernel at both archs in the heaviest variant (all flags on), fp32 and bf16."""
    for op, flags in FLAGS.items():
        combos = list(itertools.product(*flags.values()))
        for dtype in (DTYPES if matrix == "full" else NO_SPILL_DTYPES):
            for combo in (combos if matrix == "full" else combos[:1]):
                for config in range(len(kernel_configs(op))):
                    for arch in ARCHS:
                        yield Job(op, dtype, tuple(zip(flags, combo)), config, arch)


def run(matrix: str, workers: int) -> list[Result]:
    todo = list(jobs(matrix))
    if workers <= 1:
        return [compile_job(j) for j in todo]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_job, todo, chunksize=4))


def main(argv: list[str] | None = None) -> int:
    if INTERPRET:
        sys.exit("aot: unset TRITON_INTERPRET (it selects the interpreter configs, not the GPU ones)")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--matrix", choices=("ci", "full"), default="ci")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    results = run(a.matrix, a.workers)
    failed = [(r, msg) for r in results for msg in r.problems]
    for r in results:
        print(f"{r.job.op:9} {r.job.dtype:5} sm_{r.job.arch} {r.block:13} regs {r.registers:3} "
              f"STL {r.spill_stores} LDL {r.spill_loads} smem {r.shared:6} {r.seconds:5.1f}s "
              f"{dict(r.job.flags)}{'  ' + r.error if r.error else ''}")
    for r, msg in failed:
        print(f"FAIL {r.job.op} {r.job.dtype} sm_{r.job.arch} {r.block} {dict(r.job.flags)}: {msg}")
    print(f"{len(results)} compiles, {len(failed)} problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
