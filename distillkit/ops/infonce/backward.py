"""The backward pass shared by the compiled op and the reference: elementwise, O(L·B·D), no bank pass."""

from __future__ import annotations

import torch

from distillkit.ops.infonce.validate import OP_INPUT_COUNT, InfonceArgs


def infonce_backward(
    grad_loss: torch.Tensor,
    query: torch.Tensor,
    positive: torch.Tensor,
    loss: torch.Tensor,
    wsum: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the per-row loss with respect to query and positive.

    With ``p_pos = softmax`` weight of the positive ``= exp(s_pos/τ - lse) = exp(-loss)``:
    ``grad_q = g/τ · (wsum + (p_pos - 1)·positive)`` and ``grad_pos = g/τ · (p_pos - 1)·query``.

    Args:
        grad_loss: ``[L, B]`` upstream gradient of the loss.
        query: ``[L, B, D]`` forward input.
        positive: ``[L, B, D]`` forward input.
        loss: ``[L, B]`` forward output (float32, or float64 for float64 inputs).
        wsum: ``[L, B, D]`` softmax-weighted sum of the negatives' keys.
        temperature: The forward's temperature.

    Returns:
        ``(grad_query, grad_positive)``, each ``[L, B, D]`` in the inputs' dtype.
    """
    acc = wsum.dtype
    coef = (grad_loss.to(acc) / temperature).unsqueeze(-1)
    pos_weight = torch.expm1(-loss.to(acc)).unsqueeze(-1)  # p_pos - 1, exact near p_pos = 1
    grad_query = coef * (wsum + pos_weight * positive.to(acc))
    grad_positive = (coef * pos_weight) * query.to(acc)
    return grad_query.to(query.dtype), grad_positive.to(positive.dtype)


def save_for_backward(ctx, args: InfonceArgs, loss: torch.Tensor, wsum: torch.Tensor) -> None:
    """Keeps what :func:`input_gradients` needs on an autograd context (compiled op or reference)."""
    ctx.save_for_backward(args.query, args.positive, loss, wsum)
    ctx.temperature = args.temperature


def input_gradients(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients for every input of :meth:`InfonceArgs.op_inputs`: query and positive; None for the rest.

    Args:
        ctx: The autograd context filled by :func:`save_for_backward`.
        grad_loss: ``[L, B]`` upstream gradient of the loss.
    """
    query, positive, loss, wsum = ctx.saved_tensors
    grad_query, grad_positive = infonce_backward(grad_loss, query, positive, loss, wsum, ctx.temperature)
    return grad_query, grad_positive, *(None,) * (OP_INPUT_COUNT - 2)
