"""The fused linear-divergence op: public face, validation, chunked and naive pure-PyTorch paths.

Modules: :mod:`~distillkit.ops.linear_divergence.op` (``fused_linear_divergence``: the compiled CPU kernel or
the chunked path), :mod:`~distillkit.ops.linear_divergence.validate` (argument checks),
:mod:`~distillkit.ops.linear_divergence.chunked` (chunked path and naive baseline) and
:mod:`~distillkit.ops.linear_divergence.compiled` (the compiled op's fake and autograd parts). The kernel
lives in ``csrc/linear_divergence/``; the divergence math is :mod:`distillkit.ops.divergences`.
"""

from distillkit.ops.linear_divergence.chunked import chunked_linear_divergence, naive_linear_divergence
from distillkit.ops.linear_divergence.op import fused_linear_divergence

__all__ = ["chunked_linear_divergence", "fused_linear_divergence", "naive_linear_divergence"]
