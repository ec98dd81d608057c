#!/usr/bin/env bash
# The project's test command: set up (scripts/bootstrap.sh), then the test suite and
# the benchmarks in quick mode, so that neither can rot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY=${VENV:-.venv}/bin/python
"$PY" -m pytest -q tests "$@"
SEGMAMBA_BENCH_QUICK=1 "$PY" -m pytest -q benchmarks --benchmark-only --benchmark-disable-gc -p no:cacheprovider
