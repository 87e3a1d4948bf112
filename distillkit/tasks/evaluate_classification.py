"""Evaluation of a sequence classifier: loss, accuracy and macro-F1."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.objective.taps import MODEL_INPUTS
from distillkit.tasks.examples import PER_EXAMPLE, to_lists


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
    per_example: bool = False,
) -> dict[str, Any]:
    """Evaluates a classifier on labelled batches.

    Args:
        model: Returns an output with ``logits`` ``[B, C]``.
        batches: Batch dicts with ``input_ids``, ``attention_mask``, ``labels`` ``[B]``.
        num_labels: Number of classes.
        accelerator: When given, batches are moved to its device and predictions gathered from all processes.
        autocast: A context-manager factory for mixed precision, or None.
        per_example: Also return ``PER_EXAMPLE: {"eval": {example_id, label, pred, nll}}`` (one value per
            example; ``example_id`` from the batches' ``example_ids``, else the example's position).

    Returns:
        ``loss`` (mean cross-entropy), ``accuracy``, ``f1`` and ``examples``.

    """
    was_training = model.training
    model.eval()
    all_logits, all_labels, all_ids = [], [], []
    for batch in batches:
        if accelerator is not None:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        with autocast() if autocast is not None else nullcontext():
            logits = model(**inputs).logits.float()
        labels = batch["labels"]
        ids = batch.get("example_ids", torch.full_like(labels, -1))
        if accelerator is not None:
            logits, labels, ids = accelerator.gather_for_metrics((logits, labels, ids))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
        all_ids.append(ids.cpu())
    model.train(was_training)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    metrics: dict[str, Any] = classification_metrics(logits.argmax(-1), labels, num_labels)
    metrics["loss"] = float(F.cross_entropy(logits, labels))
    metrics["examples"] = len(labels)
    if per_example:
        ids = torch.cat(all_ids)
        columns = {
            "example_id": torch.where(ids >= 0, ids, torch.arange(len(ids))),
            "label": labels,
            "pred": logits.argmax(-1),
            "nll": F.cross_entropy(logits, labels, reduction="none"),
        }
        metrics[PER_EXAMPLE] = {"eval": to_lists(columns)}
    return metrics
