"""The fused ops (memory-bank InfoNCE, linear divergence), their pure-PyTorch paths, and the shared math.

One folder per op: :mod:`distillkit.ops.infonce` and :mod:`distillkit.ops.linear_divergence`;
:mod:`distillkit.ops.library` loads the compiled kernels (``distillkit._C`` on CPU, ``distillkit._C_cuda`` on
CUDA) and registers every op with torch; :mod:`distillkit.ops.divergences` is the divergence math the ops
and the loss plugins share. Each op runs its compiled kernel when built for the inputs' device, and
otherwise its pure-PyTorch path.
"""

from distillkit.ops import library
from distillkit.ops.divergences import (
    DIVERGENCES,
    check_divergence,
    divergence,
    divergence_and_grad,
    label_cross_entropy,
)
from distillkit.ops.infonce import membank_infonce, naive_membank_infonce, reference_membank_infonce
from distillkit.ops.library import compiled_available
from distillkit.ops.linear_divergence import (
    BUCKET_DIVERGENCES,
    TOPK_TAILS,
    fused_linear_divergence,
    fused_linear_divergence_topk,
)

library.load()

__all__ = [
    "DIVERGENCES",
    "BUCKET_DIVERGENCES",
    "TOPK_TAILS",
    "check_divergence",
    "compiled_available",
    "divergence",
    "divergence_and_grad",
    "fused_linear_divergence",
    "fused_linear_divergence_topk",
    "label_cross_entropy",
    "membank_infonce",
    "naive_membank_infonce",
    "reference_membank_infonce",
]
