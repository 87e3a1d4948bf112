"""Pure-PyTorch forms of the fused linear-divergence loss: chunked over rows (any device) and naive.

:func:`chunked_linear_divergence` is the device-agnostic path of
:func:`distillkit.ops.fused_linear_divergence`: it walks the rows in chunks, so at most ``chunk × V`` logits
exist at a time, and computes the gradients with respect to the student's hidden states and output weight
while it goes (the loss is terminal), using the closed-form logit gradients of
:func:`distillkit.ops.divergences.divergence_and_grad`. :func:`naive_linear_divergence` materialises both
``[N, V]`` logit tensors and lets autograd differentiate: the baseline of ``distillkit bench --op vocab``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillkit.ops.divergences import divergence, divergence_and_grad

CHUNK_ELEMENTS = 1 << 21
"""Default logits per chunk (rows × V) of the chunked path: 8 MiB per float32 temporary."""


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (the dtype sums and gradients are kept in)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def chunk_terms(
    s: torch.Tensor,
    t: torch.Tensor,
    kd_weight: torch.Tensor,
    ce_weight: torch.Tensor | None,
    labels: torch.Tensor | None,
    kind: str,
    temperature: float,
    beta: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logit gradient of one chunk.

    Args:
        s: ``[n, V]`` student logits.
        t: ``[n, V]`` teacher logits.
        kd_weight: ``[n]`` weight of each row's ``T² · D``.
        ce_weight: ``[n]`` weight of each row's cross-entropy, or None.
        labels: ``[n]`` int64 labels (-100 ignored), or None.
        kind: The divergence.
        temperature: ``T``.
        beta: JSD's mixing weight.
        alpha: The skew weight.

    Returns:
        ``(loss [], grad [n, V])`` with ``grad = ∂loss/∂s``.
    """
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    value, dz = divergence_and_grad(log_p, log_q, kind, beta=beta, alpha=alpha)
    counted = kd_weight != 0
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    loss = temperature**2 * torch.where(counted, kd_weight * value, zero).sum()
    grad = torch.where(counted.unsqueeze(-1), (temperature * kd_weight).unsqueeze(-1) * dz, zero)
    if ce_weight is not None and labels is not None:
        ce_loss, ce_grad = ce_terms(s, ce_weight, labels)
        loss, grad = loss + ce_loss, grad + ce_grad
    return loss, grad


def ce_terms(
    s: torch.Tensor, ce_weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted hard-label cross-entropy of one chunk and its logit gradient.

    Args:
        s: ``[n, V]`` student logits.
        ce_weight: ``[n]`` each row's weight.
        labels: ``[n]`` int64 labels, -100 ignored.

    Returns:
        ``(loss [], grad [n, V])``.
    """
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    active = (ce_weight != 0) & (labels >= 0)
    safe = labels.clamp_min(0).unsqueeze(-1)
    log_softmax = F.log_softmax(s, dim=-1)
    ce = -log_softmax.gather(-1, safe).squeeze(-1)
    loss = torch.where(active, ce_weight * ce, zero).sum()
    grad = log_softmax.exp() - F.one_hot(safe.squeeze(-1), s.shape[-1]).to(s.dtype)
    return loss, torch.where(active.unsqueeze(-1), ce_weight.unsqueeze(-1) * grad, zero)


class GradientsInForward(torch.autograd.Function):
    """A loss whose forward computes its gradients for ``(hidden, weight)``; backward only scales them.

    A subclass's ``forward`` ends with :meth:`keep_gradients`; its first two inputs are the student's hidden
    states and output weight, the rest get no gradient.
    """

    @staticmethod
    def keep_gradients(ctx, grad_h: torch.Tensor, grad_w: torch.Tensor, hs: torch.Tensor, ws: torch.Tensor):
        """Saves the gradients (accumulation dtype) and the inputs' dtypes for :meth:`backward`."""
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hs.dtype, ws.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        """The kept gradients times ``grad_loss``, in the inputs' dtypes; None for every other input."""
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss.to(grad_h.dtype)
        grad_hs = (grad_h * scale).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_ws = (grad_w * scale).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_hs, grad_ws, *([None] * (len(ctx.needs_input_grad) - 2))


class _ChunkedFunction(GradientsInForward):
    """Loss forward with the gradients computed chunk by chunk; backward scales them."""

    @staticmethod
    def forward(
        ctx, hs, ws, ht, wt, kd_weight, ce_weight, labels, kind, temperature, beta, alpha, chunk_rows
    ):
        acc = accumulation_dtype(hs)
        n_rows, vocab = hs.shape[0], ws.shape[0]
        ws_acc, wt_acc = ws.detach().to(acc), wt.detach().to(acc)
        grad_h = torch.zeros(hs.shape, dtype=acc, device=hs.device)
        grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device)
        loss = torch.zeros((), dtype=acc, device=hs.device)
        step = chunk_rows if chunk_rows > 0 else max(1, CHUNK_ELEMENTS // max(vocab, 1))
        for start in range(0, n_rows, step):
            rows = slice(start, min(start + step, n_rows))
            h = hs[rows].detach().to(acc)
            s = h @ ws_acc.T
            t = ht[rows].detach().to(acc) @ wt_acc.T
            chunk_loss, grad = chunk_terms(
                s,
                t,
                kd_weight[rows].to(acc),
                None if ce_weight is None else ce_weight[rows].to(acc),
                None if labels is None else labels[rows],
                kind,
                temperature,
                beta,
                alpha,
            )
            loss = loss + chunk_loss
            grad_h[rows] = grad @ ws_acc
            grad_w.addmm_(grad.T, h)
        _ChunkedFunction.keep_gradients(ctx, grad_h, grad_w, hs, ws)
        return loss


def chunked_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    kd_weight: torch.Tensor,
    ce_weight: torch.Tensor | None,
    labels: torch.Tensor | None,
    divergence_name: str,
    temperature: float,
    beta: float,
    alpha: float,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """``T² Σ_r kd_weight_r · D(p_r ‖ q_r) + Σ_r ce_weight_r · CE_r``, chunked over rows (canonical inputs).

    Args:
        student_hidden: ``[N, Ds]``.
        student_weight: ``[V, Ds]``.
        teacher_hidden: ``[N, Dt]`` (no gradient).
        teacher_weight: ``[V, Dt]`` (no gradient).
        kd_weight: ``[N]`` weight of each row's divergence.
        ce_weight: ``[N]`` weight of each row's cross-entropy (temperature 1), or None.
        labels: ``[N]`` int64 in ``[0, V)`` or -100, or None.
        divergence_name: One of :data:`distillkit.ops.divergences.DIVERGENCES`.
        temperature: ``T``.
        beta: JSD's mixing weight.
        alpha: The skew weight.
        chunk_rows: Rows per chunk; 0 picks about :data:`CHUNK_ELEMENTS` logits per chunk.

    Returns:
        Scalar loss in the accumulation dtype (float64 for float64 inputs, else float32).
    """
    return _ChunkedFunction.apply(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        kd_weight,
        ce_weight,
        labels,
        divergence_name,
        temperature,
        beta,
        alpha,
        chunk_rows,
    )


def naive_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    divergence_name: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """The same loss with full ``[N, V]`` logits and autograd (every row counted, no CE): the baseline.

    Args:
        student_hidden: ``[N, Ds]``.
        student_weight: ``[V, Ds]``.
        teacher_hidden: ``[N, Dt]``.
        teacher_weight: ``[V, Dt]``.
        divergence_name: One of :data:`distillkit.ops.divergences.DIVERGENCES`.
        temperature: ``T``.
        beta: JSD's mixing weight.
        alpha: The skew weight.

    Returns:
        Scalar loss.
    """
    student_logits = student_hidden @ student_weight.T
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.T
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * divergence(log_p, log_q, divergence_name, beta=beta, alpha=alpha).mean()
