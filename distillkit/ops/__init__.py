"""The fused memory-bank InfoNCE op, its pure-PyTorch reference and the naive baseline.

``membank_infonce`` runs the compiled kernel (``distillkit._C`` on CPU, ``distillkit._C_cuda`` on CUDA)
when built, and otherwise the chunked reference, saying so once.
"""

from distillkit.ops import _loader
from distillkit.ops._loader import compiled_available
from distillkit.ops.infonce import membank_infonce
from distillkit.ops.reference import naive_membank_infonce, reference_membank_infonce

_loader.load()

__all__ = ["compiled_available", "membank_infonce", "naive_membank_infonce", "reference_membank_infonce"]
