"""Per-kernel resources of the built CUDA extension, as a Markdown table.

    python csrc/cuda/resource_report.py [path/to/_cuda*.so]

Registers, static shared memory, stack and local memory come from
`cuobjdump --dump-resource-usage`; spill stores/loads are the STL/LDL
instructions counted in the kernel's SASS (`cuobjdump -sass`), so the numbers
describe the binary that was built, not a separate compile.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def find_cuobjdump() -> str:
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
                  shutil.which("cuobjdump") or ""]
    try:  # Triton ships one; some toolkits installs (e.g. nvcc-only) do not.
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.path.exists(path):
            return path
    sys.exit("cuobjdump not found: set CUDA_HOME to a full CUDA toolkit or install triton")


def short_name(mangled: str) -> str:
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=True).stdout.strip()
    name = name.replace("segmamba_cuda::", "").replace("c10::", "").split("(")[0]
    return re.sub(r"^void ", "", name)


def resource_usage(cuobjdump: str, so: str) -> list[dict]:
    text = subprocess.run([cuobjdump, "--dump-resource-usage", so], capture_output=True, text=True, check=True).stdout
    rows, arch = [], None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            rows.append({"mangled": m.group(1), "arch": arch, **{k: int(v) for k, v in fields.items()}})
    return rows


def spill_counts(cuobjdump: str, so: str) -> Counter:
    text = subprocess.run([cuobjdump, "-sass", so], capture_output=True, text=True, check=True).stdout
    counts: Counter = Counter()
    arch = func = None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            func = m.group(1)
            counts[(func, arch, "STL")] += 0
        elif func and (m := re.search(r"\b(STL|LDL)(\.\w+)*\s", line)):
            counts[(func, arch, m.group(1))] += 1
    return counts


def main() -> None:
    so = sys.argv[1] if len(sys.argv) > 1 else (glob.glob(os.path.join(ROOT, "segmamba_kernels", "_cuda*.so")) or [""])[0]
    if not so or not os.path.exists(so):
        sys.exit("no built segmamba_kernels/_cuda*.so: build it first (see setup.py)")
    cuobjdump = find_cuobjdump()
    spills = spill_counts(cuobjdump, so)
    # A kernel used by several translation units (e.g. the segment pass) is in the binary once per unit.
    unique = {(r["mangled"], r["arch"]): r for r in resource_usage(cuobjdump, so)}
    rows = sorted(unique.values(), key=lambda r: (r["arch"], short_name(r["mangled"])))
    print("| kernel | arch | registers | static smem (B) | stack (B) | local (B) | spill stores (STL) | spill loads (LDL) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        key = (r["mangled"], r["arch"])
        print(f"| `{short_name(r['mangled'])}` | {r['arch']} | {r['REG']} | {r['SHARED']} | {r['STACK']} | "
              f"{r['LOCAL']} | {spills[key + ('STL',)]} | {spills[key + ('LDL',)]} |")


if __name__ == "__main__":
    main()
