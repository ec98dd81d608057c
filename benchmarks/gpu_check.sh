#!/usr/bin/env bash
# The GPU check: build the CUDA kernels, test the cuda and triton backends on the GPU, time the
# kernels, on a lent GPU machine (H100/H200 image: PyTorch 2.11 CUDA 13.0, Triton 3.6, nvcc, ninja,
# pytest, pytest-xdist, pytest-benchmark, scipy, tqdm, einops; no monai, nibabel or nilearn), in at
# most 6 minutes (so that a 15-minute lease can run it twice), writing everything into $OUT.
#
#   bash benchmarks/gpu_check.sh --dry-run   # here: print the steps, their deadlines and commands
#   bash benchmarks/gpu_check.sh             # there: the 6-minute check
#   bash benchmarks/gpu_check.sh --full      # there: + the 128^3 model comparison (8 minutes)
#
# Prepare on the development machine, from the repository root (.gitignore ignores /.whl/): the
# wheels the image lacks (monai for the model comparison, nibabel which segmamba imports)
#
#   rm -rf .whl && .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl monai==1.6.1 nibabel
#
# then call the device tool's `run` with
#
#   command: bash benchmarks/gpu_check.sh     carry: [".whl"]     timeout_s: 420
#
# and give the machine back afterwards unless you rerun at once. What comes back under $OUT:
#   summary.md      each step's exit code and seconds, the versions it ran with, the result tables
#   gpu_check.log   everything the steps printed
#   tests.txt       the pytest summary of the GPU tests
#   gpu_kernels.md  scan and conv1d: cuda vs triton, fp32/bf16, the three scan orders, fwd, fwd+bwd and
#                   fwd+bwd with the deterministic backward, GB/s against a device copy
#   cuda_models.md, cuda_models.png   (--full) SegMamba vs baselines at 128^3, batch 2
#
# Time guards: every step runs under `timeout` with a deadline counted from the start (the table
# below), so a slow or hung step cannot eat the later ones' time; a step that ends early hands its
# time on. A failed step does not stop the script: its exit code goes into summary.md.
# Tests: the GPU cases of the kernel tests (test_kernels.py: cuda and triton against the reference in
# every dtype and order, the deterministic mode bitwise; test_cuda_build.py: a CUDA forward+backward
# over >= 3 chunks and several segments per order, deterministic repeats; test_triton_specific.py:
# Triton chunk carries, orders, the deterministic accumulation, the device guard; test_api.py),
# on 8 pytest-xdist workers sharing one Triton cache, with SEGMAMBA_TRITON_AUTOTUNE=0 (one config
# per kernel variant: the tests check numbers, not speed, and each extra config is a cold compile).
# The CPU emulation and the sm_80/sm_90 compile check are CI's (they need no GPU) and do not run here.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=check
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --full) MODE=full ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --full]" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/segmamba_gpu_check}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # Hopper only: half the CUDA build time
export SEGMAMBA_BUILD_CPU=0                                 # CPU kernels are CI's job, not this machine's
export MAX_JOBS=${MAX_JOBS:-16} SEGMAMBA_NVCC_THREADS=${SEGMAMBA_NVCC_THREADS:-4}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/segmamba-triton-cache}   # shared by the test workers
export PY=${PYTHON:-python3}

# Deadlines (seconds from the start) of each phase.
D_WHEELS=20 D_FACTS=35 D_BUILD=170 D_TESTS=330 D_TIMINGS=355 D_MODELS=470
TEST_FILES="tests/test_kernels.py tests/test_cuda_build.py tests/test_triton_specific.py tests/test_api.py"

if [ "$MODE" != dry ]; then
  mkdir -p "$OUT"
  LOG=$OUT/gpu_check.log
  SUMMARY=$OUT/summary.md
  printf '# GPU check, %s\n\n| step | exit | seconds |\n| --- | ---: | ---: |\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" >"$SUMMARY"
fi

# step NAME PHASE_DEADLINE_S COMMAND...: run COMMAND with a timeout that ends at the phase deadline.
step() {
  local name=$1 deadline=$2
  shift 2
  if [ "$MODE" = dry ]; then
    printf '%-14s by %3d s: %s\n' "$name" "$deadline" "$*"
    return 0
  fi
  local now left t0 rc
  now=$(date +%s)
  left=$((START + deadline - now))
  if [ "$left" -lt 5 ]; then
    echo "== $name: skipped, phase deadline passed" | tee -a "$LOG"
    echo "| $name | skipped (no time left) | 0 |" >>"$SUMMARY"
    return 0
  fi
  echo "== $name (up to ${left} s): $*" | tee -a "$LOG"
  t0=$(date +%s)
  timeout --kill-after=5 "$left" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && rc="124 (timed out)"
  echo "| $name | $rc | $(($(date +%s) - t0)) |" >>"$SUMMARY"
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s" | tee -a "$LOG"
}

# Seconds left until a deadline, minus a margin for the step's own start and end.
until_deadline() { echo $((START + $1 - $(date +%s) - $2)); }

install_wheels() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else
    echo "no .whl folder: test_api.py and the model comparison need monai and nibabel (see the header)"
  fi
}

facts() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  echo "nvcc: $(command -v nvcc || echo 'not on PATH')"
  nvcc --version 2>/dev/null | tail -n 2
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"

names = ("torch", "triton", "setuptools", "numpy", "pytest", "pytest-xdist", "monai", "nibabel")
print("python", platform.python_version(), "|", ", ".join(f"{n} {version(n)}" for n in names), "| CUDA",
      torch.version.cuda, "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
assert torch.cuda.is_available(), "no CUDA device"
EOF
}

gpu_tests() {
  # -n 8: the cuda and triton cases are independent; the workers share TRITON_CACHE_DIR, so a kernel
  # variant compiled by one is loaded by the others.
  SEGMAMBA_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -n 8 -p no:cacheprovider -o addopts= -m "not emulated" -rs \
    $TEST_FILES 2>&1 | tee "$OUT/tests.txt"
  return "${PIPESTATUS[0]}"
}

export -f install_wheels facts gpu_tests  # `timeout` runs programs, so the functions run in a child bash
export OUT TEST_FILES

if [ "$MODE" = dry ]; then
  echo "GPU check plan: the steps with their deadlines (s from the start); models-128 only with --full"
  echo "  tests = SEGMAMBA_TRITON_AUTOTUNE=0 pytest -q -n 8 -m 'not emulated' $TEST_FILES"
fi
step wheels $D_WHEELS bash -c install_wheels
export PYTHONPATH=$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
step facts $D_FACTS bash -c facts
if [ "$MODE" != dry ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device: nothing to check" | tee -a "$LOG"
  cat "$SUMMARY"
  exit 1
fi

# In place, so the tests and benchmarks import the built extension from the source tree.
step build $D_BUILD "$PY" setup.py -q build_ext --inplace
step info $((D_BUILD + 10)) "$PY" -m segmamba_kernels.info
step tests $D_TESTS bash -c gpu_tests

# Forward order first, then the other orders, then the deterministic backward (the budget cuts from the end).
step kernel-timings $D_TIMINGS "$PY" benchmarks/gpu_kernels.py --sides 64 32 --orders forward reverse inter_slice \
  --deterministic-too --ref-max-len 0 --repeats 10 --time-budget "$(until_deadline $D_TIMINGS 8)" \
  --out "${OUT:-/tmp}/gpu_kernels.md"

if [ "$MODE" != check ]; then
  # The bench marks cases it cannot start before its own budget runs out, so the table is complete.
  step models-128 $D_MODELS "$PY" -m segmamba.bench --device cuda --crops 128 --batch 2 --repeats 3 \
    --max-seconds 8 --timeout 45 --time-budget "$(until_deadline $D_MODELS 10)" \
    --models segmamba swinunetr unetr swinunetr_v2 segresnet mednext --out "${OUT:-/tmp}" --name cuda_models
fi

[ "$MODE" = dry ] && exit 0
{
  echo
  echo "total: $(($(date +%s) - START)) s"
  echo
  grep -E "passed|failed|error" "$OUT/tests.txt" | tail -n 3
  for f in "$OUT/gpu_kernels.md" "$OUT/cuda_models.md"; do
    [ -f "$f" ] && { echo; cat "$f"; }
  done
} >>"$SUMMARY"
cat "$SUMMARY"
