"""scripts/build_stamp.py: what makes bootstrap.sh rebuild the kernels, and what lets it skip the build."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def build_stamp(tmp_path: Path, monkeypatch):
    spec = importlib.util.spec_from_file_location("build_stamp", ROOT / "scripts" / "build_stamp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "scan.cpp").write_text("int f() { return 1; }\n")
    (tmp_path / "setup.py").write_text("# setup\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    for var in module.BUILD_ENV:
        monkeypatch.delenv(var, raising=False)
    return module


def test_stamp_changes_with_sources_and_build_environment(build_stamp, tmp_path: Path, monkeypatch) -> None:
    first = build_stamp.stamp()
    assert build_stamp.stamp() == first
    (tmp_path / "csrc" / "cpu" / "scan.cpp").write_text("int f() { return 2; }\n")
    edited = build_stamp.stamp()
    assert edited != first
    (tmp_path / "csrc" / "cpu" / "new.h").write_text("")
    added = build_stamp.stamp()
    assert added != edited
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert build_stamp.stamp() != added
    (tmp_path / "csrc" / "cpu" / "__pycache__").mkdir()
    (tmp_path / "csrc" / "cpu" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert build_stamp.stamp() == added  # caches are not sources


def test_built_needs_every_extension_of_the_last_build(build_stamp, monkeypatch) -> None:
    info = types.ModuleType("segmamba_kernels._build_info")
    info.BUILD_INFO = {"extensions": ["json"]}
    monkeypatch.setitem(sys.modules, "segmamba_kernels._build_info", info)
    assert build_stamp.built()
    info.BUILD_INFO = {"extensions": ["json", "segmamba_kernels._no_such_extension"]}
    assert not build_stamp.built()
