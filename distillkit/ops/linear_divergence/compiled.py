"""The Python parts of the compiled ops ``distillkit::fused_linear_divergence_fwd`` and ``..._topk_fwd``.

Both ops return the loss and its gradients with respect to the student's hidden states and output weight
(``student_hidden`` and ``student_weight`` are their first two inputs, the only differentiable ones); the
backward pass scales the gradients by the upstream gradient. :mod:`distillkit.ops.library` registers
:func:`fake` and the autograd formula (:func:`setup_context`, :func:`backward`) of each with torch when the
extension loads (this module for the dense op, :mod:`.topk_compiled` for the sparse-teacher one);
:class:`EagerFunction` is the copy-free alternative for eager calls, and :func:`run_compiled` picks one.
"""

from __future__ import annotations

import torch

OP_NAME = "distillkit::fused_linear_divergence_fwd"

HANDOVER_ELEMENTS = 1 << 20
"""From this many ``student_weight`` elements on, eager CPU calls hand the stored gradients to autograd
without a copy, and the loss can then be backpropagated only once; smaller calls keep them reusable."""


def fake(hs, ws, *_rest):
    """Output shapes and dtypes: ``loss []``, ``grad_hidden`` like ``hs``, ``grad_weight`` like ``ws``."""
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    return hs.new_empty((), dtype=acc), hs.new_empty(hs.shape, dtype=acc), ws.new_empty(ws.shape, dtype=acc)


def setup_context(ctx, inputs, output):
    """Keeps the op's gradient outputs and the dtypes of ``student_hidden`` and ``student_weight``."""
    hs, ws, *_ = inputs
    _loss, grad_h, grad_w = output
    ctx.save_for_backward(grad_h, grad_w)
    ctx.dtypes = (hs.dtype, ws.dtype)
    ctx.rest = len(inputs) - 2  # the inputs after student_hidden and student_weight
    ctx.mark_non_differentiable(grad_h, grad_w)


def _eager(tensor: torch.Tensor) -> bool:
    """True for a plain CPU tensor outside any tracing (its value may be read without breaking a graph)."""
    return type(tensor) is torch.Tensor and not torch.compiler.is_compiling() and tensor.device.type == "cpu"


def _scaled(grad_loss, grad_h, grad_w, dtypes, needs_input_grad):
    """The stored gradients times the upstream gradient, in the inputs' dtypes."""
    if _eager(grad_loss) and float(grad_loss) == 1.0:
        scaled_h, scaled_w = grad_h, grad_w  # the usual terminal case: no [V, Ds] copy
    else:
        scale = grad_loss.to(grad_h.dtype)
        scaled_h, scaled_w = grad_h * scale, grad_w * scale
    grad_hs = scaled_h.to(dtypes[0]) if needs_input_grad[0] else None
    grad_ws = scaled_w.to(dtypes[1]) if needs_input_grad[1] else None
    return grad_hs, grad_ws


def backward(ctx, grad_loss, _grad_h, _grad_w):
    """Gradients of ``student_hidden`` and ``student_weight``; None for the other inputs."""
    grad_h, grad_w = ctx.saved_tensors
    grads = _scaled(grad_loss, grad_h, grad_w, ctx.dtypes, ctx.needs_input_grad)
    return *grads, *(None,) * ctx.rest


class EagerFunction(torch.autograd.Function):
    """Eager calls of the compiled op: hands its gradients over without a copy.

    Through the op's registered autograd formula the stored ``[V, Ds]`` gradient is still referenced when
    autograd accumulates it, so autograd copies it into ``weight.grad``; here ctx gives up its only
    reference first, so a second backward through the same loss is refused. Traced calls
    (``torch.compile``) and small problems use the registered formula.
    """

    @staticmethod
    def forward(ctx, op, hs, ws, *rest):
        """Runs ``op`` on its inputs (``hs``, ``ws``, then the rest of the schema's); returns the loss."""
        loss, grad_h, grad_w = op(hs, ws, *rest)
        ctx.gradients = [grad_h, grad_w]
        ctx.dtypes = (hs.dtype, ws.dtype)
        ctx.rest = len(rest)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        """Scales the stored gradients by ``grad_loss``; refuses a second call."""
        if not ctx.gradients:
            raise RuntimeError(
                "fused_linear_divergence: backward ran twice through the same loss; its gradients are "
                "computed in the forward pass and handed over once (compute the loss again instead)"
            )
        grad_h, grad_w = ctx.gradients
        ctx.gradients.clear()
        grads = _scaled(grad_loss, grad_h, grad_w, ctx.dtypes, ctx.needs_input_grad[1:])
        del grad_h, grad_w
        return None, *grads, *(None,) * ctx.rest


def run_compiled(op, args: tuple) -> torch.Tensor:
    """The loss of the compiled ``op`` on ``args`` (``student_hidden``, ``student_weight``, the rest).

    Traced calls and small weights go through the op's registered autograd formula (the loss may be
    backpropagated again); eager calls with a large ``student_weight`` through :class:`EagerFunction`.
    """
    if torch.compiler.is_compiling() or args[1].numel() < HANDOVER_ELEMENTS:
        return op(*args)[0]
    return EagerFunction.apply(op, *args)
