"""Print the stamp of what the compiled kernels are built from, or check that they are built.

    python scripts/build_stamp.py               # one line: a hash of csrc/, setup.py, pyproject.toml,
                                                # the build flags and the torch/Python versions
    python scripts/build_stamp.py --check FILE  # exit 0 if FILE holds that hash and every
                                                # extension the last build made is present

scripts/bootstrap.sh stores the stamp after a build and skips the next build when --check passes.
Run with the environment's Python, from the repository root.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("csrc", "setup.py", "pyproject.toml")
# Everything setup.py reads from the environment changes what is built.
BUILD_ENV = ("SEGMAMBA_BUILD_CUDA", "SEGMAMBA_BUILD_CPU", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH",
             "CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS")


def stamp() -> str:
    h = hashlib.sha256()
    for top in SOURCES:
        path = ROOT / top
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    for var in BUILD_ENV:
        h.update(f"{var}={os.environ.get(var, '')}\0".encode())
    import torch

    h.update(f"torch={torch.__version__} python={platform.python_version()} {sys.executable}".encode())
    return h.hexdigest()


def built() -> bool:
    """True when the package imports and every extension listed by the last build is present."""
    try:
        from segmamba_kernels._build_info import BUILD_INFO
    except ImportError:
        return False
    return all(importlib.util.find_spec(name) is not None for name in BUILD_INFO["extensions"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        stored = Path(sys.argv[2])
        sys.exit(0 if stored.is_file() and stored.read_text().strip() == stamp() and built() else 1)
    print(stamp())
