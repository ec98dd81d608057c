import os

# PyTorch 2.14's oneDNN bf16 Conv3d weight-gradient kernel for AVX512-BF16 CPUs
# intermittently returns inf/NaN at tiny spatial sizes (about 1 call in 40 at
# 64 channels x 2x2x4, the deepest stage of the test models; it happens with the
# reference backend too). Capping oneDNN at AVX2 before torch loads it keeps the
# bf16 autocast tests about our code. See benchmarks/RESULTS.md, known issues.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# Triton kernels run on CPU tensors only under the interpreter, which must be
# switched on before triton decorates any kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class _RecordedOps(TorchDispatchMode):
    """Records the name of every ATen op that runs while it is active, in `seen`."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def record_ops() -> type[_RecordedOps]:
    """`with record_ops() as ops:` ... then `ops.seen` lists the ATen ops that ran (layout-copy checks)."""
    return _RecordedOps
