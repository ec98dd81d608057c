#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with torch,
# the runtime and test dependencies, and this package built (CPU kernels; CUDA
# kernels too where a CUDA toolkit is found). Safe to re-run: it installs the
# dependencies again only when their specification changed, and rebuilds the kernels
# only when their sources, setup.py, the build flags or torch changed, or an extension
# is missing (see scripts/build_stamp.py).
#
# The console gets one line per step; everything the tools print goes to $VENV/bootstrap.log.
#
#   TORCH_SPEC   torch requirement to install (default torch==2.14.1)
#   VENV         where the environment goes (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
T0=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
LOG="$VENV/bootstrap.log"
DEPS_STAMP="$VENV/.segmamba-deps-stamp"
BUILD_STAMP="$VENV/.segmamba-build-stamp"
echo "== bootstrap $(date -u '+%F %T UTC')" >>"$LOG"

# step WHAT COMMAND...: run COMMAND with its output in the log; one console line with the time.
step() {
  local what=$1 t0=$(date +%s)
  shift
  printf 'bootstrap: %s ... ' "$what"
  echo "-- $what: $*" >>"$LOG"
  if "$@" >>"$LOG" 2>&1; then
    echo "done in $(( $(date +%s) - t0 )) s"
  else
    local rc=$?
    echo "FAILED (exit $rc) after $(( $(date +%s) - t0 )) s; last lines of $LOG:"
    tail -n 25 "$LOG" | sed 's/^/    /'
    exit "$rc"
  fi
}

install_deps() {
  "$PY" -m pip install -q --upgrade pip
  # numpy with torch, before anything imports torch: the build then finds it.
  "$PY" -m pip install -q "$TORCH_SPEC" numpy setuptools wheel ninja pybind11
}

deps_stamp=$( { echo "$TORCH_SPEC"; cat pyproject.toml; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$DEPS_STAMP" 2>/dev/null)" = "$deps_stamp" ]; then
  echo "bootstrap: torch and build tools up to date ($TORCH_SPEC)"
else
  rm -f "$BUILD_STAMP"  # new dependencies: build again
  step "installing $TORCH_SPEC and the build tools" install_deps
fi

if "$PY" scripts/build_stamp.py --check "$BUILD_STAMP" 2>>"$LOG"; then
  echo "bootstrap: kernels up to date (same sources, flags and torch as the last build)"
else
  rm -f "$BUILD_STAMP"
  # Build against the torch just installed (no second copy in an isolated build env).
  # Editable, so the compiled extensions also sit next to the sources and the tests
  # see them whether they import from the tree or from site-packages.
  step "installing the package and its dependencies, building the kernels (4-6 min on 2 cores)" \
    "$PY" -m pip install -q --no-build-isolation -e ".[test]"
  "$PY" scripts/build_stamp.py >"$BUILD_STAMP"
fi
echo "$deps_stamp" >"$DEPS_STAMP"

"$PY" -m segmamba_kernels.info
echo "bootstrap: ready in $(( $(date +%s) - T0 )) s; full log: $LOG"
