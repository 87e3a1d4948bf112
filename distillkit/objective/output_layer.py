"""Logit-reading terms without the logits: the models' output layers in place of ``[tokens, vocab]`` tensors.

A causal LM's logits are its last hidden state times its output embedding, ``logits = hidden @ weight.T``. A
term that can work from those two factors (``kd`` and ``ce`` do, through
:func:`distillkit.ops.fused_linear_divergence`) declares ``LossTerm.reads_output_layer``; when every term of
the objective that reads logits does, the loop asks both models for
:attr:`~.taps.TapRequest.output_layer` instead of ``logits``: each model runs without its head
(:func:`run_to_output_layer`), and no ``[B, T, V]`` tensor is ever built for training.

Whether a run does so is the run's decision (``train.fused_logits``, :mod:`distillkit.run.fused_logits`);
this module only splits a model at its output layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["output_layer_parts", "run_to_output_layer"]


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
