"""The fused linear-divergence op: public face, validation, chunked and naive pure-PyTorch paths.

Modules: :mod:`~distillkit.ops.linear_divergence.op` (``fused_linear_divergence``: the compiled CPU kernel or
the chunked path), :mod:`~distillkit.ops.linear_divergence.topk` (``fused_linear_divergence_topk``: the same
against a sparse top-k teacher), :mod:`~distillkit.ops.linear_divergence.validate` (argument checks),
:mod:`~distillkit.ops.linear_divergence.chunked` (chunked path and naive baseline) and
:mod:`~distillkit.ops.linear_divergence.compiled` / ``topk_compiled`` (the compiled ops' fake and autograd
parts). The kernels live in ``csrc/linear_divergence/``; the divergence math is
:mod:`distillkit.ops.divergences`.
"""

from distillkit.ops.linear_divergence.chunked import chunked_linear_divergence, naive_linear_divergence
from distillkit.ops.linear_divergence.op import fused_linear_divergence
from distillkit.ops.linear_divergence.topk import BUCKET_DIVERGENCES, TOPK_TAILS, fused_linear_divergence_topk

__all__ = [
    "BUCKET_DIVERGENCES",
    "TOPK_TAILS",
    "chunked_linear_divergence",
    "fused_linear_divergence",
    "fused_linear_divergence_topk",
    "naive_linear_divergence",
]
