"""Build and load the CUDA emulator's test extension (csrc/emu/README.md).

    python csrc/emu/build.py [--sanitize address] [--cuda-src DIR] [--build-dir DIR]

The kernel sources of csrc/cuda (every *.cu) and the emulator's self-test kernels are
compiled as C++ with SEGMAMBA_EMULATE against csrc/emu/cuda_emu.h, instrumented with
-fsanitize=thread so that every load and store reaches the emulator's race detector
(runtime.cpp implements the __tsan_* hooks; libtsan is never linked). With
sanitize="address" everything is built with AddressSanitizer instead (no race detector:
GCC cannot combine the two); such a module only loads into a process that has libasan
preloaded, see csrc/emu/asan.sh.

Each object is cached under the build directory by a hash of its flags, its source and the
local headers it includes, so only what changed is recompiled (in parallel, MAX_JOBS).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
EMU_DIR = ROOT / "csrc" / "emu"
CUDA_DIR = ROOT / "csrc" / "cuda"
MODULE_NAME = "segmamba_emu"
MODES = ("race", "address")


def _torch_paths() -> tuple[list[str], str, bool, str]:
    import torch
    from torch.utils import cpp_extension

    return (cpp_extension.include_paths(), cpp_extension.library_paths()[0], bool(torch._C._GLIBCXX_USE_CXX11_ABI),
            torch.__version__)


def _local_headers(source: Path, include_dirs: list[Path], seen: set[Path]) -> None:
    """Adds the quoted includes of `source` that live in include_dirs, recursively."""
    for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', source.read_text(), re.M):
        for d in [source.parent, *include_dirs]:
            path = (d / name).resolve()
            if path.is_file():
                if path not in seen:
                    seen.add(path)
                    _local_headers(path, include_dirs, seen)
                break


def _digest(parts: list[str], files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() + b"\0")
    for f in sorted(files):
        h.update(str(f.name).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _compile(cmd: list[str], out: Path) -> None:
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    res = subprocess.run(cmd + ["-o", str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling for the CUDA emulator failed:\n{shlex.join(cmd)}\n{res.stderr[-20000:]}")
    tmp.replace(out)


def build(sanitize: str | None = None, cuda_src: Path | None = None, build_dir: Path | None = None,
          jobs: int | None = None, verbose: bool = False) -> Path:
    """Compile what changed and link; returns the path of the extension module."""
    mode = "address" if sanitize == "address" else "race"
    if sanitize not in (None, "address"):
        raise ValueError(f"sanitize: expected None or 'address', got {sanitize!r}")
    cuda_src = Path(cuda_src or CUDA_DIR).resolve()
    build_dir = Path(build_dir or ROOT / "build" / "emu").resolve()
    (build_dir / "obj").mkdir(parents=True, exist_ok=True)
    includes, torch_lib, cxx11_abi, torch_version = _torch_paths()
    cxx = os.environ.get("CXX", "g++")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    include_dirs = [cuda_src, EMU_DIR]
    common = ["-std=c++20", "-fPIC", "-O2", "-DSEGMAMBA_EMULATE", f"-D_GLIBCXX_USE_CXX11_ABI={int(cxx11_abi)}",
              "-Wno-unknown-pragmas", *(f"-I{d}" for d in include_dirs)]
    common += [f for inc in includes for f in ("-isystem", inc)]
    sanitizer = (["-fsanitize=address", "-fno-omit-frame-pointer", "-g"] if mode == "address"
                 else ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"])
    kernel_flags = common + ["-x", "c++"] + sanitizer
    runtime_flags = common + (sanitizer if mode == "address" else [])
    host_flags = common + ["-isystem", sysconfig.get_paths()["include"], f"-DTORCH_EXTENSION_NAME={MODULE_NAME}",
                           "-DTORCH_API_INCLUDE_EXTENSION_H"] + (sanitizer if mode == "address" else [])
    units = [(src, kernel_flags) for src in sorted(cuda_src.glob("*.cu"))]
    units += [(EMU_DIR / "selftest.cu", kernel_flags), (EMU_DIR / "runtime.cpp", runtime_flags),
              (EMU_DIR / "bindings.cpp", host_flags)]

    todo, objects = [], []
    for src, flags in units:
        headers: set[Path] = set()
        _local_headers(src, include_dirs, headers)
        # shared.ld recognises the kernel objects by this prefix.
        prefix = "kernel-" if flags is kernel_flags else ""
        obj = build_dir / "obj" / f"{prefix}{src.stem}-{_digest([version, torch_version, *flags], [src, *headers])}.o"
        objects.append(obj)
        if not obj.exists():
            todo.append(([cxx, *flags, "-c", str(src)], obj))
    workers = jobs or int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    if verbose and todo:
        print(f"emulator build: compiling {len(todo)} of {len(units)} units with {workers} jobs", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(_compile, cmd, obj) for cmd, obj in todo]:
            f.result()

    link = [*objects, f"-Wl,-T,{EMU_DIR / 'shared.ld'}", f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu",
            "-ltorch_python"] + (["-fsanitize=address"] if mode == "address" else [])
    out_dir = build_dir / f"{mode}-{_digest([version, *map(str, link)], [EMU_DIR / 'shared.ld'])}"
    so = out_dir / f"{MODULE_NAME}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not so.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        _compile([cxx, "-shared", *map(str, link)], so)
    return so


def load(sanitize: str | None = None, cuda_src: Path | None = None, build_dir: Path | None = None) -> ModuleType:
    """Build (if needed) and import the emulator extension."""
    import torch  # noqa: F401  (the extension links against torch's libraries)

    so = build(sanitize, cuda_src, build_dir, verbose=True)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sanitize", choices=["address"], default=None)
    ap.add_argument("--cuda-src", type=Path, default=None, help="kernel sources (default: csrc/cuda)")
    ap.add_argument("--build-dir", type=Path, default=None, help="default: build/emu")
    args = ap.parse_args()
    print(build(args.sanitize, args.cuda_src, args.build_dir, verbose=True))


if __name__ == "__main__":
    main()
