"""Model benchmarks behind `python -m segmamba.bench` and benchmarks/test_bench_models.py.

cases    one (model, crop, mode) measurement, in-process or in a fresh interpreter
report   the Markdown table and the PNG plot
stages   where a training step's time goes (per stage, per module, per op kind)
busy     the main job alone and beside a busy process
"""

# First, before anything loads torch: the benchmark processes use the trainer's OpenMP wait policy.
from segmamba import cpu_threads  # noqa: F401
