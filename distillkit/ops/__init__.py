"""The fused ops (memory-bank InfoNCE, linear divergence), their pure-PyTorch references and baselines.

``membank_infonce`` runs the compiled kernel (``distillkit._C`` on CPU, ``distillkit._C_cuda`` on CUDA)
when built, and otherwise the chunked reference, saying so once.
"""

from distillkit.ops import _loader
from distillkit.ops._loader import compiled_available
from distillkit.ops.divergences import (
    DIVERGENCES,
    check_divergence,
    divergence,
    divergence_and_grad,
    label_cross_entropy,
)
from distillkit.ops.fused_linear_divergence import fused_linear_divergence
from distillkit.ops.fused_linear_divergence import kernel_available as _linear_divergence_kernel
from distillkit.ops.infonce import membank_infonce
from distillkit.ops.reference import naive_membank_infonce, reference_membank_infonce

_loader.load()
_linear_divergence_kernel()  # registers the op's fake and autograd parts before any tracing

__all__ = [
    "DIVERGENCES",
    "check_divergence",
    "divergence",
    "divergence_and_grad",
    "label_cross_entropy",
    "compiled_available",
    "fused_linear_divergence",
    "membank_infonce",
    "naive_membank_infonce",
    "reference_membank_infonce",
]
