"""Logit-reading terms without the logits: the models' output layers in place of ``[tokens, vocab]`` tensors.

A causal LM's logits are its last hidden state times its output embedding, ``logits = hidden @ weight.T``. A
term that can work from those two factors (``kd`` and ``ce`` do, through
:func:`distillkit.ops.fused_linear_divergence`) declares ``LossTerm.reads_output_layer``; when every term of
the objective that reads logits does, the loop asks both models for
:attr:`~.taps.TapRequest.output_layer` instead of ``logits``: each model runs without its head
(:func:`run_to_output_layer`), and no ``[B, T, V]`` tensor is ever built for training.

``train.fused_logits`` decides (:func:`choose_output_layer`): ``auto`` (the default) uses the output layer
where the objective and the models allow it, ``always`` refuses a run where they do not, ``never`` keeps
logits. A model qualifies when it has an output embedding without a bias and a base model to run without it,
and when its logits on one training example equal ``hidden @ weight.T`` (which excludes, e.g., logit
soft-capping or scaling after the product).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distillkit.errors import ConfigError

__all__ = ["check_output_layer", "choose_output_layer", "output_layer_parts", "run_to_output_layer"]


def output_layer_parts(model: nn.Module) -> tuple[nn.Module, torch.Tensor] | str:
    """The module that computes the output layer's input, and the output layer's weight.

    Args:
        model: A model, typically a Hugging Face ``...ForCausalLM``.

    Returns:
        ``(base_model, weight [V, D])``, or a short reason why the model has no such split.

    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "it has no output embedding (get_output_embeddings() gives no [V, D] weight)"
    if getattr(head, "bias", None) is not None:
        return "its output layer has a bias"
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return "it has no base model to run without its output layer"
    return base, weight


def run_to_output_layer(
    model: nn.Module, inputs: Mapping[str, Any]
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Runs ``model`` without its output layer.

    Args:
        model: A model for which :func:`output_layer_parts` finds the split.
        inputs: Keyword inputs of the model's forward (``input_ids``, ``attention_mask``, ``output_*``).

    Returns:
        ``(base_output, hidden [B, T, D], weight [V, D])``: the base model's output (its ``hidden_states``
        and ``attentions`` when asked for), the output layer's input and its weight.

    Raises:
        ValueError: If the model has no such split.

    """
    parts = output_layer_parts(model)
    if isinstance(parts, str):
        raise ValueError(f"{type(model).__name__} cannot be run to its output layer: {parts}")
    base, weight = parts
    output = base(**inputs)
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0]
    return output, hidden, weight


@torch.no_grad()
def check_output_layer(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> str | None:
    """Checks on the first example of ``batch`` that the model's logits are ``hidden @ weight.T``.

    Args:
        model: The model (its training mode is kept).
        batch: A batch of model inputs ``[B, T]``.

    Returns:
        None when they are (within float32 rounding), else the reason it cannot be used.

    """
    from distillkit.objective.taps import MODEL_INPUTS

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
        teachers: Teacher name -> live model, or anything else for a teacher read from a cache.
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
        models: list[tuple[str, Any]] = [("the student", student)] if readers["student"] else []
        models += [(f"teacher '{name}'", teachers.get(name)) for name in readers["teachers"]]
        for role, model in models:
            if not isinstance(model, nn.Module):
                reason = f"{role} is read from a cache of logits"
            else:
                problem = check_output_layer(model, batch)
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
