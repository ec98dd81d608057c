import os

import torch

# Triton kernels run on CPU tensors only under the interpreter, which must be
# switched on before triton decorates any kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
