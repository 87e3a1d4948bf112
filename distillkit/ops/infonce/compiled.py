"""The Python parts of the compiled op ``distillkit::membank_infonce_fwd``: its call, fake and autograd.

:mod:`distillkit.ops.library` registers :func:`fake` and the autograd formula (:func:`setup_context`,
:func:`backward`) with torch when the extension loads.
"""

from __future__ import annotations

import torch

from distillkit.ops.infonce.backward import input_gradients, save_for_backward
from distillkit.ops.infonce.validate import InfonceArgs

OP_NAME = "distillkit::membank_infonce_fwd"


def forward(args: InfonceArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs the compiled op on canonical arguments.

    Args:
        args: Canonical :class:`InfonceArgs`.

    Returns:
        ``(loss [L, B], lse [L, B], wsum [L, B, D])`` in float32 (float64 for float64 inputs).
    """
    return torch.ops.distillkit.membank_infonce_fwd(*args.op_inputs())


def fake(query, *_other_inputs):
    """Output shapes and dtypes of the op (torch calls it with the schema's inputs, positionally)."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    layers, batch, dim = query.shape
    loss = query.new_empty((layers, batch), dtype=acc)
    lse = query.new_empty((layers, batch), dtype=acc)
    wsum = query.new_empty((layers, batch, dim), dtype=acc)
    return loss, lse, wsum


def setup_context(ctx, inputs, output):
    """Keeps what :func:`backward` needs: query, positive, loss, wsum and the temperature."""
    loss, lse, wsum = output
    save_for_backward(ctx, InfonceArgs(*inputs), loss, wsum)
    ctx.mark_non_differentiable(lse, wsum)


def backward(ctx, grad_loss, _grad_lse, _grad_wsum):
    """Gradients of the op's inputs: query and positive, None for the rest."""
    return input_gradients(ctx, grad_loss)
