#!/usr/bin/env bash
# The emulated CUDA tests under AddressSanitizer, in one command (from anywhere):
#
#   bash csrc/emu/asan.sh [pytest args...]
#
# Builds the emulator's extension with -fsanitize=address (build/emu, cached) and runs
# `pytest -m emulated tests/test_cuda_emulated.py` with libasan preloaded, which a Python
# process needs before it loads an ASan-built extension. libstdc++ is preloaded too: an
# extension that links it statically (Triton's) otherwise trips ASan's __cxa_throw
# interceptor. Leak detection is off (the interpreter's own allocations are not ours).
set -euo pipefail
cd "$(dirname "$0")/../.."
CXX=${CXX:-g++}
export LD_PRELOAD="$($CXX -print-file-name=libasan.so) $($CXX -print-file-name=libstdc++.so)${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
export SEGMAMBA_EMU_SANITIZE=address
# --capture=sys: an ASan report goes to file descriptor 2 and then the process exits; with
# pytest's default fd capture that report would be lost.
exec .venv/bin/python -m pytest -q -m emulated -p no:cacheprovider --capture=sys tests/test_cuda_emulated.py "$@"
