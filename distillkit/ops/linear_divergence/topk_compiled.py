"""The Python parts of the compiled op ``distillkit::fused_linear_divergence_topk_fwd`` (sparse teacher).

The op has the dense op's outputs (and ``student_hidden`` and ``student_weight`` as its first inputs), so its
fake and autograd parts are those of :mod:`distillkit.ops.linear_divergence.compiled`;
:mod:`distillkit.ops.library` registers them under this module's :data:`OP_NAME`.
"""

from __future__ import annotations

from distillkit.ops.linear_divergence.compiled import backward, fake, setup_context

OP_NAME = "distillkit::fused_linear_divergence_topk_fwd"

__all__ = ["OP_NAME", "backward", "fake", "setup_context"]
