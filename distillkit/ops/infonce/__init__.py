"""The memory-bank InfoNCE op: public face, pure-PyTorch reference, validation, backward and self-check.

Modules: :mod:`~distillkit.ops.infonce.op` (``membank_infonce``: the compiled kernel or the reference),
:mod:`~distillkit.ops.infonce.validate` (arguments and their canonical form),
:mod:`~distillkit.ops.infonce.reference` (chunked reference and naive baseline),
:mod:`~distillkit.ops.infonce.backward` (the gradient shared by kernel and reference),
:mod:`~distillkit.ops.infonce.compiled` (the compiled op's fake and autograd parts) and
:mod:`~distillkit.ops.infonce.selfcheck` (the CUDA kernel's first-use check). The kernels live in
``csrc/membank_infonce/``.
"""

from distillkit.ops.infonce.op import membank_infonce
from distillkit.ops.infonce.reference import naive_membank_infonce, reference_membank_infonce

__all__ = ["membank_infonce", "naive_membank_infonce", "reference_membank_infonce"]
