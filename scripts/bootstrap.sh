#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with torch,
# the runtime and test dependencies, and this package built (CPU kernels; CUDA
# kernels too where a CUDA toolkit is found). Safe to re-run: it only adds what is missing.
#
#   TORCH_SPEC   torch requirement to install (default torch==2.14.1)
#   VENV         where the environment goes (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH_SPEC" setuptools wheel ninja pybind11
# Build against the torch just installed (no second copy in an isolated build env).
# Editable, so the compiled extensions also sit next to the sources and the tests
# see them whether they import from the tree or from site-packages.
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
echo "bootstrap: package built in $(( $(date +%s) - start ))s"
"$PY" -m segmamba_kernels.info
