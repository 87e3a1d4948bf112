"""Evaluation of a sequence classifier: loss, accuracy and macro-F1."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.objective.taps import MODEL_INPUTS


def classification_metrics(
    predictions: torch.Tensor, labels: torch.Tensor, num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-averaged F1.

    Args:
        predictions: ``[N]`` predicted class indices.
        labels: ``[N]`` true class indices.
        num_labels: Number of classes ``C``.

    Returns:
        ``{"accuracy": ..., "f1": ...}`` (F1 averaged over classes that occur in labels or predictions).

    """
    predictions, labels = predictions.long().cpu(), labels.long().cpu()
    accuracy = float((predictions == labels).float().mean()) if len(labels) else 0.0
    scores = []
    for c in range(num_labels):
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = int(((predictions != c) & (labels == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": accuracy, "f1": sum(scores) / len(scores) if scores else 0.0}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    num_labels: int,
    accelerator: Any = None,
    autocast: Any = None,
) -> dict[str, float]:
    """Evaluates a classifier on labelled batches.

    Args:
        model: Returns an output with ``logits`` ``[B, C]``.
        batches: Batch dicts with ``input_ids``, ``attention_mask``, ``labels`` ``[B]``.
        num_labels: Number of classes.
        accelerator: When given, batches are moved to its device and predictions gathered from all processes.
        autocast: A context-manager factory for mixed precision, or None.

    Returns:
        ``loss`` (mean cross-entropy), ``accuracy``, ``f1`` and ``examples``.

    """
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for batch in batches:
        if accelerator is not None:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        with autocast() if autocast is not None else nullcontext():
            logits = model(**inputs).logits.float()
        labels = batch["labels"]
        if accelerator is not None:
            logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    model.train(was_training)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    metrics = classification_metrics(logits.argmax(-1), labels, num_labels)
    metrics["loss"] = float(F.cross_entropy(logits, labels))
    metrics["examples"] = len(labels)
    return metrics
