"""Argument checks of :func:`distillkit.ops.fused_linear_divergence`.

Every problem a caller can fix raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape,
device, value) naming the argument and, where there is one, the fix, before any kernel runs.
"""

from __future__ import annotations

import math
import numbers

import torch

from distillkit.ops.divergences import DIVERGENCES, check_divergence

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_tensor(name: str, value: object, dims: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fused_linear_divergence: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fused_linear_divergence: {name} must be float32, float64, bfloat16 or float16: {value.dtype}"
        )
    if value.dim() != dims:
        shape = "[N, D]" if name.endswith("hidden") else "[V, D]"
        raise ValueError(f"fused_linear_divergence: {name} must be {shape} (2-D), got {list(value.shape)}")
    return value


def _check_number(name: str, value: object, low: float, high: float | None = None) -> float:
    """Returns ``value`` as a float, checking ``low < value`` (``< high`` when given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"fused_linear_divergence: {name} must be a float, got {type(value).__name__}")
    number = float(value)
    if not (math.isfinite(number) and number > low and (high is None or number < high)):
        bounds = f"in ({low}, {high})" if high is not None else f"> {low}"
        raise ValueError(f"fused_linear_divergence: {name} must be {bounds}, got {number}")
    return number


def _check_devices(op: str, hs: torch.Tensor, **others: torch.Tensor) -> None:
    """Every tensor of ``others`` must be on ``student_hidden``'s device."""
    for name, tensor in others.items():
        if tensor.device != hs.device:
            raise ValueError(
                f"{op}: {name} is on {tensor.device} but student_hidden is on {hs.device}; move every input "
                "to one device"
            )


def _check_divergence(op: str, divergence: object) -> None:
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"{op}: unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")


def validate(
    hs: torch.Tensor,
    ws: torch.Tensor,
    ht: torch.Tensor,
    wt: torch.Tensor,
    divergence: str,
    temperature: float,
    beta: float,
    alpha: float,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ce_weight: float,
) -> tuple[float, float, float, float]:
    """Checks the arguments of :func:`~distillkit.ops.fused_linear_divergence`.

    Args:
        hs: ``[N, Ds]`` student_hidden.
        ws: ``[V, Ds]`` student_weight.
        ht: ``[N, Dt]`` teacher_hidden.
        wt: ``[V, Dt]`` teacher_weight.
        divergence: One of :data:`~distillkit.ops.divergences.DIVERGENCES`.
        temperature: ``T > 0``.
        beta: JSD's mixing weight in ``(0, 1)``.
        alpha: The skew weight in ``(0, 1)``.
        mask: ``[N]`` bool, or None.
        labels: ``[N]`` integer token ids, or None.
        ce_weight: ``>= 0``; above 0 it needs ``labels``.

    Returns:
        ``(temperature, beta, alpha, ce_weight)`` as floats.

    Raises:
        TypeError: A tensor or number of the wrong kind or dtype.
        ValueError: Wrong shapes (the message names both sizes), devices or values.
    """
    hs = _check_tensor("student_hidden", hs, 2)
    ws = _check_tensor("student_weight", ws, 2)
    ht = _check_tensor("teacher_hidden", ht, 2)
    wt = _check_tensor("teacher_weight", wt, 2)
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(
            f"fused_linear_divergence: the vocabularies differ: student_weight has V = {ws.shape[0]} rows"
            f" and teacher_weight V = {wt.shape[0]}; distillation over tokens needs a shared vocabulary"
        )
    for side, hidden, weight, size in (("student", hs, ws, "Ds"), ("teacher", ht, wt, "Dt")):
        if weight.shape[1] != hidden.shape[1]:
            raise ValueError(
                f"fused_linear_divergence: {side}_weight is {list(weight.shape)} but {side}_hidden has "
                f"{size} = {hidden.shape[1]} features; the weight must be [V, {hidden.shape[1]}]"
            )
    if ht.shape[0] != hs.shape[0]:
        raise ValueError(
            f"fused_linear_divergence: student_hidden has N = {hs.shape[0]} rows but teacher_hidden "
            f"{ht.shape[0]}; pass the same tokens of both models"
        )
    _check_devices("fused_linear_divergence", hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt)
    _check_divergence("fused_linear_divergence", divergence)
    return _check_rest(hs, divergence, temperature, beta, alpha, mask, labels, ce_weight)


def _check_rest(
    hs: torch.Tensor,
    divergence: str,
    temperature: float,
    beta: float,
    alpha: float,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ce_weight: float,
) -> tuple[float, float, float, float]:
    """The checks both ops share: the numbers, ``mask``, ``labels`` and ``ce_weight``."""
    temperature = _check_number("temperature", temperature, 0.0)
    beta = _check_number("beta", beta, 0.0, 1.0)
    alpha = _check_number("alpha", alpha, 0.0, 1.0)
    check_divergence(divergence, beta, alpha)
    ce_weight = 0.0 if ce_weight == 0 else _check_number("ce_weight", ce_weight, 0.0)
    n_rows = hs.shape[0]
    for name, tensor in (("mask", mask), ("labels", labels)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"fused_linear_divergence: {name} must be a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.shape != (n_rows,):
            raise ValueError(
                f"fused_linear_divergence: {name} must be [N] = [{n_rows}], got {list(tensor.shape)}"
            )
        if tensor.device != hs.device:
            raise ValueError(
                f"fused_linear_divergence: {name} is on {tensor.device} but the rows on {hs.device}"
            )
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(
            f"fused_linear_divergence: mask must be bool (True = the row counts), got {mask.dtype}"
        )
    if labels is not None and not _is_integer(labels):
        raise TypeError(
            f"fused_linear_divergence: labels must be integer token ids (int64), got {labels.dtype}"
        )
    if ce_weight > 0 and labels is None:
        raise ValueError("fused_linear_divergence: ce_weight > 0 needs labels ([N] int64, -100 = ignored)")
    return temperature, beta, alpha, ce_weight


def _is_integer(tensor: torch.Tensor) -> bool:
    return not (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool)


BUCKET_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
"""The divergences the sparse-teacher op has with the tail as one bucket (the spread tail has them all)."""

TOPK_TAILS = ("spread", "bucket")
"""How the sparse-teacher op treats the teacher's mass outside its top k (see its module)."""


def validate_topk(
    hs: torch.Tensor,
    ws: torch.Tensor,
    index: torch.Tensor,
    logp: torch.Tensor,
    log_tail: torch.Tensor,
    divergence: str,
    temperature: float,
    beta: float,
    alpha: float,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ce_weight: float,
    tail: str,
) -> tuple[float, float, float, float]:
    """Checks the arguments of :func:`~distillkit.ops.fused_linear_divergence_topk`.

    Args:
        hs: ``[N, Ds]`` student_hidden.
        ws: ``[V, Ds]`` student_weight.
        index: ``[N, k]`` teacher_index, integer token ids.
        logp: ``[N, k]`` teacher_logp.
        log_tail: ``[N]`` teacher_log_tail.
        divergence: One of :data:`~distillkit.ops.divergences.DIVERGENCES` (of :data:`BUCKET_DIVERGENCES`
            with ``tail="bucket"``).
        temperature: ``T > 0``.
        beta: JSD's mixing weight in ``(0, 1)``.
        alpha: The skew weight in ``(0, 1)``.
        mask: ``[N]`` bool, or None.
        labels: ``[N]`` integer token ids, or None.
        ce_weight: ``>= 0``; above 0 it needs ``labels``.
        tail: One of :data:`TOPK_TAILS`.

    Returns:
        ``(temperature, beta, alpha, ce_weight)`` as floats.

    Raises:
        TypeError: A tensor or number of the wrong kind or dtype.
        ValueError: Wrong shapes, devices or values, or a divergence that needs the dense teacher.
    """
    hs = _check_tensor("student_hidden", hs, 2)
    ws = _check_tensor("student_weight", ws, 2)
    if ws.shape[1] != hs.shape[1]:
        raise ValueError(
            f"fused_linear_divergence_topk: student_weight is {list(ws.shape)} but student_hidden has "
            f"Ds = {hs.shape[1]} features; the weight must be [V, {hs.shape[1]}]"
        )
    if not isinstance(index, torch.Tensor) or not _is_integer(index):
        raise TypeError("fused_linear_divergence_topk: teacher_index must be an integer tensor of token ids")
    n_rows, vocab = hs.shape[0], ws.shape[0]
    if index.dim() != 2 or index.shape[0] != n_rows or index.shape[1] > vocab:
        raise ValueError(
            f"fused_linear_divergence_topk: teacher_index must be [N, k] = [{n_rows}, k] with k <= V = "
            f"{vocab}, got {list(index.shape)}"
        )
    logp = _check_tensor("teacher_logp", logp, 2)
    log_tail = _check_tensor("teacher_log_tail", log_tail, 1)
    if logp.shape != index.shape or log_tail.shape != (n_rows,):
        raise ValueError(
            f"fused_linear_divergence_topk: teacher_logp must be [N, k] = {list(index.shape)} and "
            f"teacher_log_tail [N] = [{n_rows}], got {list(logp.shape)} and {list(log_tail.shape)}"
        )
    _check_devices(
        "fused_linear_divergence_topk",
        hs,
        student_weight=ws,
        teacher_index=index,
        teacher_logp=logp,
        teacher_log_tail=log_tail,
    )
    if tail not in TOPK_TAILS:
        raise ValueError(
            f"fused_linear_divergence_topk: tail must be one of {', '.join(TOPK_TAILS)}, got {tail!r}"
        )
    _check_divergence("fused_linear_divergence_topk", divergence)
    if tail == "bucket" and divergence not in BUCKET_DIVERGENCES:
        raise ValueError(
            f"fused_linear_divergence_topk: divergence {divergence!r} has no form with the tail as one "
            f"bucket; use {', '.join(BUCKET_DIVERGENCES)}, or tail='spread'"
        )
    return _check_rest(hs, divergence, temperature, beta, alpha, mask, labels, ce_weight)
