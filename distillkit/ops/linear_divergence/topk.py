"""The fused linear divergence against a sparse teacher: its top-k tokens per row and its tail mass.

A top-k teacher cache stores, per token, the teacher's ``k`` most probable token ids, their
log-probabilities and the log of the remaining mass ``r``. :func:`fused_linear_divergence_topk` compares the
student with that teacher without the teacher's GEMM and without any ``[N, V]`` tensor (the student's logits
are taken in blocks, as in the dense op), in one of two ways (``tail``):

- ``spread`` (the default): the tail mass is spread evenly over the other ``V − k`` tokens, each
  ``log(r / (V − k))``: the teacher is the distribution the dense reading of the cache gives
  (:func:`distillkit.teacher_cache.densify_topk`), and ``D`` is the full-vocabulary divergence against it, any
  of :data:`~distillkit.ops.divergences.DIVERGENCES`. At ``T ≠ 1`` the known logits and the spread tail are
  divided by ``T``.
- ``bucket``: the ``k + 1`` buckets (each top-k token, and the rest) of the two distributions are compared,
  as verl and Arcee's DistillKit do: ``P = (p_1 … p_k, r)``, ``Q = (q_1 … q_k, 1 − Σ q_i)``, so the
  student's mass outside the top ``k`` meets the teacher's tail and the shape of either tail does not count.
  Forward KL, reverse KL and JSD (:data:`BUCKET_DIVERGENCES`). At ``T ≠ 1`` the teacher's buckets are those
  of the spread teacher at ``T``; at ``T = 1`` they are the stored values.

On CPU the compiled kernel ``distillkit::fused_linear_divergence_topk_fwd`` runs
(``csrc/linear_divergence/``: the dense kernel with the spread teacher's logits in place of its GEMM, or
``cpu_topk_kernel.cpp``); elsewhere :func:`chunked_topk_linear_divergence`.
"""

from __future__ import annotations

import math

import torch

from distillkit.ops import library
from distillkit.ops.divergences import divergence_and_grad
from distillkit.ops.linear_divergence import compiled, topk_compiled
from distillkit.ops.linear_divergence.chunked import (
    CHUNK_ELEMENTS,
    GradientsInForward,
    accumulation_dtype,
    ce_terms,
    chunk_terms,
)
from distillkit.ops.linear_divergence.op import row_weights
from distillkit.ops.linear_divergence.validate import BUCKET_DIVERGENCES, TOPK_TAILS, validate_topk

__all__ = [
    "BUCKET_DIVERGENCES",
    "TOPK_TAILS",
    "chunked_topk_linear_divergence",
    "fused_linear_divergence_topk",
    "spread_logits",
    "topk_buckets",
]


def topk_kernel_available() -> bool:
    """Whether the compiled CPU kernel of the sparse-teacher op is built and registered."""
    return library.has_kernel(topk_compiled.OP_NAME, "cpu")


def fused_linear_divergence_topk(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_index: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_log_tail: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    tail: str = "spread",
) -> torch.Tensor:
    """``kd``'s token-level loss against a top-k teacher, from the student's output layer (see the module).

    ``loss = T² · mean_{counted rows} D(p ‖ q) + ce_weight · mean_{rows with a label} CE(softmax(s), label)``
    with ``s = student_hidden @ student_weight.T``, ``p`` the teacher of the ``tail`` form (over all tokens,
    or over the ``k + 1`` buckets). Gradients reach ``student_hidden`` and ``student_weight`` only; like
    :func:`~distillkit.ops.fused_linear_divergence` they are computed in the forward pass, so the result may
    be backpropagated once.

    Example::

        values, index = teacher_log_probs.topk(64, dim=-1)                 # [N, 64] each
        log_tail = torch.log(-torch.expm1(values.logsumexp(-1).clamp_max(0)))
        loss = fused_linear_divergence_topk(h, lm_head.weight, index, values, log_tail, divergence="jsd")

    Args:
        student_hidden: ``[N, Ds]`` the student's last hidden states.
        student_weight: ``[V, Ds]`` the student's output embedding.
        teacher_index: ``[N, k]`` the teacher's top-k token ids per row, distinct, in ``[0, V)``.
        teacher_logp: ``[N, k]`` their log-probabilities under the teacher (temperature 1).
        teacher_log_tail: ``[N]`` log of the teacher's mass outside the top k (``-inf``: none).
        divergence: One of :data:`~distillkit.ops.divergences.DIVERGENCES`; with ``tail="bucket"`` one of
            :data:`BUCKET_DIVERGENCES` (``forward_kl``, ``reverse_kl``, ``jsd``).
        temperature: ``T > 0``.
        beta: JSD's mixing weight in ``(0, 1)``.
        alpha: The skew weight in ``(0, 1)`` (the skew forms, spread tail).
        mask: ``[N]`` bool, the rows whose divergence counts (all when None).
        labels: ``[N]`` next-token ids, -100 for none; needed when ``ce_weight > 0``.
        ce_weight: Weight of the hard-label cross-entropy on the student's logits (0 disables it).
        tail: ``spread`` or ``bucket`` (:data:`TOPK_TAILS`; see the module).

    Returns:
        Scalar loss, float32 (float64 when ``student_hidden`` is float64).

    Raises:
        TypeError: A tensor or number of the wrong kind or dtype.
        ValueError: Wrong shapes or devices, or a divergence the ``tail`` form does not have.
    """
    temperature, beta, alpha, ce_weight = validate_topk(
        student_hidden,
        student_weight,
        teacher_index,
        teacher_logp,
        teacher_log_tail,
        divergence,
        temperature,
        beta,
        alpha,
        mask,
        labels,
        ce_weight,
        tail,
    )
    kd_weight, row_ce, row_labels = row_weights(student_hidden, mask, labels, ce_weight)
    args = (
        student_hidden,
        student_weight,
        teacher_index.to(torch.int64),
        teacher_logp.detach(),
        teacher_log_tail.detach(),
        kd_weight,
        row_ce,
        row_labels,
        divergence,
        temperature,
        beta,
        alpha,
        tail,
    )
    if student_hidden.device.type == "cpu" and topk_kernel_available():
        return compiled.run_compiled(torch.ops.distillkit.fused_linear_divergence_topk_fwd, args)
    return chunked_topk_linear_divergence(*args)


def spread_logits(
    teacher_index: torch.Tensor, teacher_logp: torch.Tensor, teacher_log_tail: torch.Tensor, vocab: int
) -> torch.Tensor:
    """The spread teacher's log-probabilities over all tokens: the top k as given, the tail spread evenly.

    Args:
        teacher_index: ``[n, k]`` int64.
        teacher_logp: ``[n, k]``.
        teacher_log_tail: ``[n]``.
        vocab: ``V``.

    Returns:
        ``[n, V]`` in ``teacher_logp``'s dtype (``-inf`` off the top k when ``k = V``).
    """
    k = teacher_index.shape[-1]
    fill = (
        teacher_log_tail - math.log(vocab - k) if k < vocab else torch.full_like(teacher_log_tail, -math.inf)
    )
    dense = fill.unsqueeze(-1).expand(teacher_index.shape[0], vocab).clone()
    return dense.scatter_(-1, teacher_index, teacher_logp)


def topk_buckets(
    student_logits: torch.Tensor,
    teacher_index: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_log_tail: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the ``k + 1`` buckets of both models (the tail last; no tail when ``k = V``).

    Args:
        student_logits: ``[n, V]`` (differentiable).
        teacher_index: ``[n, k]`` int64.
        teacher_logp: ``[n, k]``.
        teacher_log_tail: ``[n]``.
        temperature: ``T``.

    Returns:
        ``(log_p, log_q)``, each ``[n, k + 1]`` (``[n, k]`` when ``k = V``), in ``student_logits``' dtype.
    """
    vocab, k = student_logits.shape[-1], teacher_index.shape[-1]
    z = student_logits / temperature
    lse = z.logsumexp(-1, keepdim=True)
    log_q = z.gather(-1, teacher_index) - lse
    teacher = teacher_logp.to(z.dtype) / temperature
    if k < vocab:
        tail = z.scatter(-1, teacher_index, float("-inf")).logsumexp(-1, keepdim=True)
        log_q = torch.cat([log_q, tail - lse], dim=-1)
        rest = math.log(vocab - k)
        teacher_tail = rest + (teacher_log_tail.to(z.dtype).unsqueeze(-1) - rest) / temperature
        teacher = torch.cat([teacher, teacher_tail], dim=-1)
    return teacher - teacher.logsumexp(-1, keepdim=True), log_q


def _topk_chunk_terms(
    s: torch.Tensor,
    index: torch.Tensor,
    logp: torch.Tensor,
    log_tail: torch.Tensor,
    kd_weight: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logit gradient of one chunk against the sparse teacher (closed form).

    With ``∂D/∂z_b`` of each bucket (:func:`~distillkit.ops.divergences.divergence_and_grad` over the
    buckets), a top-k logit gets its bucket's; a tail logit gets the tail's times its share of the tail,
    ``softmax`` over the tail logits (robust where the tail's mass underflows).

    Returns:
        ``(loss [], grad [n, V])`` with ``grad = ∂loss/∂s``.
    """
    k = index.shape[-1]
    log_p, log_q = topk_buckets(s, index, logp, log_tail, temperature)
    value, dz = divergence_and_grad(log_p, log_q, kind, beta=beta)
    logit_grad = torch.zeros_like(s)
    if dz.shape[-1] > k:
        share = torch.softmax((s / temperature).scatter(-1, index, float("-inf")), dim=-1)
        logit_grad = share * dz[:, k:]
    logit_grad = logit_grad.scatter(-1, index, dz[:, :k])
    counted = kd_weight != 0
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    loss = temperature**2 * torch.where(counted, kd_weight * value, zero).sum()
    grad = torch.where(counted.unsqueeze(-1), (temperature * kd_weight).unsqueeze(-1) * logit_grad, zero)
    return loss, grad


class _TopKChunkedFunction(GradientsInForward):
    """Loss forward with the gradients computed chunk by chunk; backward scales them."""

    @staticmethod
    def forward(
        ctx, hs, ws, index, logp, log_tail, kd_weight, ce_weight, labels, kind, temperature, beta, alpha, tail
    ):
        acc = accumulation_dtype(hs)
        ws_acc = ws.detach().to(acc)
        grad_h = torch.zeros(hs.shape, dtype=acc, device=hs.device)
        grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device)
        loss = torch.zeros((), dtype=acc, device=hs.device)
        step = max(1, CHUNK_ELEMENTS // max(ws.shape[0], 1))
        for start in range(0, hs.shape[0], step):
            rows = slice(start, min(start + step, hs.shape[0]))
            h = hs[rows].detach().to(acc)
            s = h @ ws_acc.T
            row_ce = None if ce_weight is None else ce_weight[rows].to(acc)
            if tail == "spread":
                teacher = spread_logits(index[rows], logp[rows].to(acc), log_tail[rows].to(acc), s.shape[-1])
                chunk, grad = chunk_terms(
                    s, teacher, kd_weight[rows].to(acc), row_ce, labels_rows(labels, rows), kind, temperature,
                    beta, alpha,
                )  # fmt: skip
            else:
                chunk, grad = _topk_chunk_terms(
                    s,
                    index[rows],
                    logp[rows],
                    log_tail[rows],
                    kd_weight[rows].to(acc),
                    kind,
                    temperature,
                    beta,
                )
                if row_ce is not None:
                    ce_loss, ce_grad = ce_terms(s, row_ce, labels[rows])
                    chunk, grad = chunk + ce_loss, grad + ce_grad
            loss = loss + chunk
            grad_h[rows] = grad @ ws_acc
            grad_w.addmm_(grad.T, h)
        _TopKChunkedFunction.keep_gradients(ctx, grad_h, grad_w, hs, ws)
        return loss


def labels_rows(labels: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """``labels[rows]``, or None."""
    return None if labels is None else labels[rows]


def chunked_topk_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_index: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_log_tail: torch.Tensor,
    kd_weight: torch.Tensor,
    ce_weight: torch.Tensor | None,
    labels: torch.Tensor | None,
    divergence_name: str,
    temperature: float,
    beta: float,
    alpha: float = 0.1,
    tail: str = "spread",
) -> torch.Tensor:
    """The sparse-teacher loss on any device, in chunks of rows (canonical inputs, as the compiled op).

    Args:
        student_hidden: ``[N, Ds]``.
        student_weight: ``[V, Ds]``.
        teacher_index: ``[N, k]`` int64.
        teacher_logp: ``[N, k]``.
        teacher_log_tail: ``[N]``.
        kd_weight: ``[N]`` weight of each row's divergence.
        ce_weight: ``[N]`` weight of each row's cross-entropy, or None.
        labels: ``[N]`` int64 in ``[0, V)`` or -100, or None.
        divergence_name: The divergence (of :data:`BUCKET_DIVERGENCES` with ``tail="bucket"``).
        temperature: ``T``.
        beta: JSD's mixing weight.
        alpha: The skew weight.
        tail: ``spread`` or ``bucket``.

    Returns:
        Scalar loss in the accumulation dtype.
    """
    return _TopKChunkedFunction.apply(
        student_hidden,
        student_weight,
        teacher_index,
        teacher_logp,
        teacher_log_tail,
        kd_weight,
        ce_weight,
        labels,
        divergence_name,
        temperature,
        beta,
        alpha,
        tail,
    )
