"""Whether logit-reading terms read the models' output layers instead of logits (``train.fused_logits``).

``auto`` (the default) uses the output layers where the objective and the models allow it, ``always`` refuses
a run where they do not, ``never`` keeps logits. A model qualifies when it has an output embedding without a
bias and a base model to run without it (:func:`distillkit.objective.output_layer.output_layer_parts`), and
when its logits on one training example equal ``hidden @ weight.T`` (which excludes, e.g., logit soft-capping
or scaling after the product).

A teacher read from a top-k cache qualifies when every term reading it works from its top-k logits (``kd``
with forward KL, reverse KL or JSD): the cache then gives ``Taps.topk_logits`` in place of the output layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distillkit.errors import ConfigError
from distillkit.objective.output_layer import output_layer_parts, run_to_output_layer
from distillkit.objective.taps import MODEL_INPUTS, teacher_view

__all__ = ["check_output_layer", "choose_output_layer"]


@torch.no_grad()
def check_output_layer(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> str | None:
    """Checks on the first example of ``batch`` that the model's logits are ``hidden @ weight.T``.

    Args:
        model: The model (its training mode is kept).
        batch: A batch of model inputs ``[B, T]``.

    Returns:
        None when they are (within float32 rounding), else the reason it cannot be used.

    """
    parts = output_layer_parts(model)
    if isinstance(parts, str):
        return parts
    device = next(model.parameters()).device
    inputs = {k: batch[k][:1].to(device) for k in MODEL_INPUTS if k in batch}
    was_training = model.training
    model.eval()
    try:
        logits = getattr(model(**inputs), "logits", None)
        _, hidden, weight = run_to_output_layer(model, inputs)
    finally:
        model.train(was_training)
    if logits is None:
        return "it returns no logits"
    product = hidden.float() @ weight.float().T
    if product.shape != logits.shape:
        return f"its logits {tuple(logits.shape)} are not [B, T, V] = {tuple(product.shape)}"
    logits = logits.float()
    scale = float(logits.abs().max().clamp_min(1.0))
    error = float((product - logits).abs().max())
    if error > 1e-3 * scale:
        return (
            f"its logits are not its last hidden state times its output embedding (they differ by up to "
            f"{error:.3g}; e.g. the model scales or caps its logits)"
        )
    return None


def _cached_teacher_blocker(objective: Any, name: str, source: Any) -> str | None:
    """Why the terms cannot read cached teacher ``name`` with the output layers, or None when they can.

    They can when the cache holds top-k logits (``source.serves_topk``) and every term reading that teacher's
    logits works from them (:meth:`~distillkit.objective.terms.LossTerm.reads_topk_teacher`).
    """
    if not getattr(source, "serves_topk", False):
        return f"teacher '{name}' is read from a cache of logits, not of top-k logits"
    for label in objective.logit_readers()["terms"]:
        term = objective.terms[label]
        if name in objective.term_teachers[label].names and not term.reads_topk_teacher():
            return (
                f"teacher '{name}' is read from a top-k cache, which objective term '{label}' (loss "
                f"'{term.name}') cannot read without its logits"
            )
    return None


def choose_output_layer(
    mode: str,
    objective: Any,
    student: nn.Module,
    teachers: Mapping[str, Any],
    batch: Mapping[str, torch.Tensor],
    announce: bool = True,
) -> bool:
    """Decides whether the run reads the output layers in place of logits, and switches the objective to it.

    Args:
        mode: ``train.fused_logits``: ``auto``, ``always`` or ``never``.
        objective: The :class:`~distillkit.objective.objective.DistillationObjective`.
        student: The student.
        teachers: Teacher name -> live model, or anything else (a
            :class:`~distillkit.teacher_cache.TeacherCache`) for a teacher read from a cache.
        batch: A training batch (its first example checks each model's output layer).
        announce: Print one line when the output layers are used.

    Returns:
        Whether the objective now reads the output layers.

    Raises:
        ConfigError: With ``always``, saying why the output layers cannot be used.

    """
    if mode == "never":
        return False
    reason = objective.output_layer_blocker()
    readers = objective.logit_readers()
    if reason is None:
        models: list[tuple[str, Any, Any]] = [("the student", student, batch)] if readers["student"] else []
        models += [
            (f"teacher '{name}'", teachers.get(name), teacher_view(batch)) for name in readers["teachers"]
        ]
        names = [None] * readers["student"] + readers["teachers"]
        for (role, model, inputs), name in zip(models, names, strict=True):
            if not isinstance(model, nn.Module):
                reason = _cached_teacher_blocker(objective, name, model)
            else:
                problem = check_output_layer(model, inputs)
                reason = None if problem is None else f"{role} cannot: {problem}"
            if reason is not None:
                break
    if reason is not None:
        if mode == "always":
            raise ConfigError(
                f"train.fused_logits is 'always', but the output layers cannot replace the logits: {reason}. "
                "Set train.fused_logits to auto or never"
            )
        return False
    objective.read_output_layer(True)
    if announce:
        terms = ", ".join(readers["terms"])
        print(
            f"distillkit: {terms} read(s) the models' output layers through the fused linear-divergence op: "
            "no [tokens, vocab] logits are built for training (train.fused_logits: never turns this off)"
        )
    return True
