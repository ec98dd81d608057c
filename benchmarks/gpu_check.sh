#!/usr/bin/env bash
# The GPU check: build the kernels, test every backend, time the kernels and the 128^3 model
# comparison on a lent GPU machine (H100/H200 image: PyTorch 2.11 CUDA 13.0, Triton, nvcc, ninja,
# pytest, pytest-benchmark, einops; no monai), in under 8 minutes, writing everything into $OUT.
#
# Prepare on the development machine, from the repository root (.gitignore already ignores /.whl/):
#
#   rm -rf .whl && .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl monai==1.6.1
#
# then call the device tool's `run` with
#
#   command: bash benchmarks/gpu_check.sh     carry: [".whl"]     timeout_s: 540
#
# and give the machine back afterwards unless you rerun at once. What comes back under $OUT:
#   summary.md      each step's exit code and seconds, then the two result tables
#   gpu_check.log   everything the steps printed
#   gpu_kernels.md  scan and conv1d: cuda vs triton vs reference, fp32/bf16, fwd and fwd+bwd, GB/s vs copy
#   cuda_models.md, cuda_models.png   SegMamba vs baselines at 128^3, batch 2 (time, max allocated)
#
# Time guards: every step runs under `timeout`, and each phase has a deadline counted from the
# start (build 230 s, tests 330 s, kernel timings 400 s, models 465 s), so a slow or hung step
# cannot eat the later ones' time; a step that ends early hands its time on. A failed step does not
# stop the script: its exit code goes into summary.md and the next step runs.
# Run locally without a GPU it stops at once (step `gpu` fails); nothing here is CPU-meaningful.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/segmamba_gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.md
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # Hopper only: half the CUDA build time
export SEGMAMBA_BUILD_CPU=0                                 # CPU kernels are CI's job, not this machine's
export MAX_JOBS=${MAX_JOBS:-16} SEGMAMBA_NVCC_THREADS=${SEGMAMBA_NVCC_THREADS:-4}
export PY=${PYTHON:-python3}

printf '# GPU check, %s\n\n| step | exit | seconds |\n| --- | ---: | ---: |\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" >"$SUMMARY"

# step NAME PHASE_DEADLINE_S COMMAND...: run COMMAND with a timeout that ends at the phase deadline.
step() {
  local name=$1 deadline=$2
  shift 2
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

install_wheels() {
  # monai (and anything else the image lacks) travels as wheels in .whl; see the header.
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else
    echo "no .whl folder: the model comparison needs monai (see the header of this script)"
  fi
}

gpu_facts() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv &&
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name())" &&
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
}

export -f install_wheels gpu_facts  # `timeout` runs programs, so the functions run in a child bash
step wheels 60 bash -c install_wheels
export PYTHONPATH=$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
step gpu 70 bash -c gpu_facts
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device: nothing to check" | tee -a "$LOG"
  cat "$SUMMARY"
  exit 1
fi

# In place, so the tests and benchmarks import the built extension from the source tree.
step build 230 "$PY" setup.py -q build_ext --inplace
step info 240 "$PY" -m segmamba_kernels.info

# Every backend against the reference (cuda and triton on CUDA tensors), and the CUDA build's contract.
step test-kernels 330 "$PY" -m pytest -q -p no:cacheprovider -o addopts= -rs tests/test_kernels.py tests/test_cuda_build.py

step kernel-timings 400 "$PY" benchmarks/gpu_kernels.py --time-budget $((START + 385 - $(date +%s))) \
  --out "$OUT/gpu_kernels.md"

# The bench marks cases it cannot start before its own budget runs out, so the table is complete.
step models-128 465 "$PY" -m segmamba.bench --device cuda --crops 128 --batch 2 --repeats 3 --max-seconds 8 \
  --timeout 45 --time-budget $((START + 455 - $(date +%s))) --models segmamba swinunetr unetr swinunetr_v2 segresnet mednext --out "$OUT" --name cuda_models

{
  echo
  echo "total: $(($(date +%s) - START)) s"
  for f in "$OUT/gpu_kernels.md" "$OUT/cuda_models.md"; do
    [ -f "$f" ] && { echo; cat "$f"; }
  done
} >>"$SUMMARY"
cat "$SUMMARY"
