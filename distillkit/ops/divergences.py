"""Token-level divergences between a teacher distribution ``p`` and a student distribution ``q``.

Every function takes log-probabilities over the last dimension (``log_p`` of the teacher, ``log_q`` of the
student, both ``[..., V]`` float32 or float64) and returns the divergence per position ``[...]``:

============================  ==========================================================  ==============
name                          formula                                                     from
============================  ==========================================================  ==============
``forward_kl``                ``KL(p ‖ q) = Σ p·(log p − log q)``                          Hinton et al.
``reverse_kl``                ``KL(q ‖ p)``                                                MiniLLM
``jsd``                       ``β·KL(p ‖ m) + (1−β)·KL(q ‖ m)``, ``m = β·p + (1−β)·q``     GKD
``tvd``                       ``½·Σ |p − q|``
``skew_forward_kl``           ``KL(p ‖ α·p + (1−α)·q)``                                    DistiLLM
``skew_reverse_kl``           ``KL(q ‖ α·q + (1−α)·p)``                                    DistiLLM
============================  ==========================================================  ==============

Terms with a zero weight (``p = 0`` in ``KL(p ‖ ·)``) are exactly 0, and neither the value nor its gradient
is NaN when either distribution has exact zeros (e.g. logits of ``-inf``). A divergence that is infinite
(``KL(p ‖ q)`` with ``q = 0`` where ``p > 0``) is ``inf``.

:func:`divergence_and_grad` also returns the gradient with respect to the student's logits, in closed form;
the fused linear-divergence op (:mod:`distillkit.ops.linear_divergence`) uses it block by block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
"""The divergence names, as ``kd``'s ``divergence`` parameter and the fused op accept them."""


def _weighted_log_ratio(weight: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Returns ``weight · (log_a − log_b)``, exactly 0 (value and gradient) where ``weight == 0``."""
    live = weight > 0
    ratio = torch.where(live, log_a - log_b, torch.zeros_like(log_a))
    return torch.where(live, weight * ratio, torch.zeros_like(weight))


def _log_mixture(first: torch.Tensor, second: torch.Tensor, weight: float) -> torch.Tensor:
    """Returns ``log(weight·first + (1−weight)·second)`` of probabilities, clamped at tiny (never -inf)."""
    tiny = torch.finfo(first.dtype).tiny
    return torch.log((weight * first + (1.0 - weight) * second).clamp_min(tiny))


def check_divergence(divergence: str, beta: float, alpha: float) -> None:
    """Raises ``ValueError`` for an unknown divergence or a mixing weight outside ``(0, 1)``.

    Args:
        divergence: One of :data:`DIVERGENCES`.
        beta: JSD's mixing weight (checked only for ``jsd``).
        alpha: The skew weight (checked only for the skew forms).

    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{divergence}'; choose one of {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    if divergence.startswith("skew_") and not 0.0 < alpha < 1.0:
        raise ValueError(f"{divergence} needs 0 < alpha < 1, got {alpha}")


def divergence(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Divergence between the teacher's ``p`` and the student's ``q`` at every position (differentiable).

    Args:
        log_p: ``[..., V]`` teacher log-probabilities.
        log_q: ``[..., V]`` student log-probabilities, same shape and dtype.
        kind: One of :data:`DIVERGENCES`.
        beta: JSD's mixing weight, ``0 < β < 1``.
        alpha: The skew forms' mixing weight, ``0 < α < 1``.

    Returns:
        ``[...]`` the divergence per position, in the inputs' dtype.

    """
    check_divergence(kind, beta, alpha)
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        terms = _weighted_log_ratio(p, log_p, log_q)
    elif kind == "reverse_kl":
        terms = _weighted_log_ratio(q, log_q, log_p)
    elif kind == "jsd":
        log_m = _log_mixture(p, q, beta)
        terms = beta * _weighted_log_ratio(p, log_p, log_m)
        terms = terms + (1.0 - beta) * _weighted_log_ratio(q, log_q, log_m)
    elif kind == "tvd":
        terms = 0.5 * (p - q).abs()
    elif kind == "skew_forward_kl":
        terms = _weighted_log_ratio(p, log_p, _log_mixture(p, q, alpha))
    else:  # skew_reverse_kl
        terms = _weighted_log_ratio(q, log_q, _log_mixture(q, p, alpha))
    return terms.sum(dim=-1)


def divergence_and_grad(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The divergence per position and its gradient with respect to the student's logits, in closed form.

    With ``q = softmax(z)`` and ``g = ∂D/∂q`` (treating ``q`` as free), ``∂D/∂z = q·(g − Σ q·g)``:
    ``forward_kl`` gives ``q − p``; ``reverse_kl`` ``g = log q − log p``; ``jsd`` ``g = (1−β)·log(q/m)``;
    ``tvd`` ``g = ½·sign(q − p)``; ``skew_forward_kl`` ``g = −(1−α)·p/m``; ``skew_reverse_kl``
    ``g = log(q/m) − α·q/m`` (constants cancel).

    Args:
        log_p: ``[..., V]`` teacher log-probabilities.
        log_q: ``[..., V]`` student log-probabilities of ``softmax(z)``.
        kind: One of :data:`DIVERGENCES`.
        beta: JSD's mixing weight.
        alpha: The skew forms' mixing weight.

    Returns:
        ``(value [...], grad [..., V])``: the divergence and ``∂D/∂z`` (rows with an infinite divergence
        may have non-finite gradients).

    """
    value = divergence(log_p, log_q, kind, beta=beta, alpha=alpha)
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return value, q - p
    if kind == "reverse_kl":
        live = q > 0
        g = torch.where(live, log_q - torch.where(live, log_p, torch.zeros_like(log_p)), torch.zeros_like(q))
    elif kind == "jsd":
        log_m = _log_mixture(p, q, beta)
        g = (1.0 - beta) * torch.where(q > 0, log_q - log_m, torch.zeros_like(q))
    elif kind == "tvd":
        g = 0.5 * torch.sign(q - p)
    elif kind == "skew_forward_kl":
        m = (alpha * p + (1.0 - alpha) * q).clamp_min(torch.finfo(q.dtype).tiny)
        g = -(1.0 - alpha) * p / m
    else:  # skew_reverse_kl
        log_m = _log_mixture(q, p, alpha)
        g = torch.where(q > 0, log_q - log_m - alpha * torch.exp(log_q - log_m), torch.zeros_like(q))
    mean_g = (q * g).sum(dim=-1, keepdim=True)
    return value, q * (g - mean_g)


def label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits against hard labels, in float32.

    Args:
        logits: ``[B, C]`` or ``[B, T, V]``.
        labels: ``[B]`` or ``[B, T]`` class indices; -100 is ignored.

    Returns:
        Scalar mean over the counted positions.

    """
    logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
