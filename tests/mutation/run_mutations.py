"""Mutation check of the emulated CUDA tests (not run in CI).

    .venv/bin/python tests/mutation/run_mutations.py [--only SUBSTRING] [--list] [--out FILE]

Every `__syncthreads()` in csrc/cuda is removed, and every `atomicAdd(` is turned into a
plain read-modify-write (segmamba_emu_plain_add of csrc/emu/cuda_emu.h: `*p += v`, the float4
one included), one at a time. Each mutant of the kernel sources is built for the emulator
(build/emu caches the objects it shares with the original) and
`pytest -x -m emulated tests/test_cuda_emulated.py` runs against it; a mutant is caught when a
test fails. Prints (and with --out writes) a Markdown table: the mutation, the first test that
failed, and why. Exit status 1 if any mutant survives.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA = ROOT / "csrc" / "cuda"
WORK = ROOT / "build" / "mutants"


@dataclass(frozen=True)
class Mutation:
    file: str
    line: int
    start: int  # character offsets of the replaced text in the file
    end: int
    replacement: str
    what: str


def _atomic_call_end(text: str, open_paren: int) -> int:
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError("unbalanced parentheses")


def find_mutations() -> list[Mutation]:
    out = []
    for path in sorted(CUDA.glob("*.cu*")) + sorted(CUDA.glob("*.h")):
        text = path.read_text()
        code = re.sub(r"//[^\n]*", lambda m: " " * len(m.group()), text)  # no matches inside comments
        for m in re.finditer(r"__syncthreads\(\);", code):
            out.append(Mutation(path.name, text.count("\n", 0, m.start()) + 1, m.start(), m.end(), ";",
                                "remove `__syncthreads()`"))
        for m in re.finditer(r"\batomicAdd\(", code):
            end = _atomic_call_end(code, m.end() - 1)
            call = " ".join(text[m.start():end].split())
            out.append(Mutation(path.name, text.count("\n", 0, m.start()) + 1, m.start(), m.start() + len("atomicAdd"),
                                "segmamba_emu_plain_add", f"`{call}` -> plain `+=`"))
    return out


def make_mutant(mut: Mutation, index: int) -> Path:
    dst = WORK / f"src-{index:02d}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(CUDA, dst)
    text = (CUDA / mut.file).read_text()
    (dst / mut.file).write_text(text[:mut.start] + mut.replacement + text[mut.end:])
    return dst


def run_tests(src: Path) -> tuple[bool, str, str, float]:
    """(caught, first failing test, reason, seconds)."""
    env = dict(os.environ, SEGMAMBA_EMU_CUDA_SRC=str(src), COLUMNS="400")  # untruncated failure lines
    env.pop("SEGMAMBA_EMU_SANITIZE", None)
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-m", "emulated", "-p", "no:cacheprovider",
                          "tests/test_cuda_emulated.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    if res.returncode == 0:
        return False, "", "all passed", seconds
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$", res.stdout, re.M)
    if not failed:
        return True, "(no test ran)", res.stdout[-400:].strip().replace("\n", " "), seconds
    reason = (failed.group(2) or "").strip()
    return True, failed.group(1).split("::", 1)[-1], reason, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the mutations whose description or file contains this")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = ap.parse_args()
    muts = [m for m in find_mutations() if args.only in f"{m.file}:{m.line} {m.what}"]
    if args.list:
        for i, m in enumerate(muts):
            print(f"{i:2d} {m.file}:{m.line} {m.what}")
        return
    rows = ["| # | where | mutation | caught by (first failing test) | failure |", "|---|---|---|---|---|"]
    survivors = 0
    for i, m in enumerate(muts):
        caught, test, reason, seconds = run_tests(make_mutant(m, i))
        survivors += not caught
        reason = re.sub(r"\s+", " ", reason.replace("|", "\\|"))[:160]
        row = f"| {i} | {m.file}:{m.line} | {m.what} | {'`' + test + '`' if caught else '**SURVIVED**'} | {reason} |"
        rows.append(row)
        print(row, f"({seconds:.0f} s)", flush=True)
    table = "\n".join(rows)
    print(f"\n{table}\n\n{len(muts) - survivors} of {len(muts)} mutants caught")
    if args.out:
        args.out.write_text(table + "\n")
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
