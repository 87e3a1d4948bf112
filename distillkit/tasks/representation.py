"""``representation``: task-agnostic distillation of an encoder on unlabelled text (embedding models).

No labels and no head: terms read hidden states (``l2``, ``cosine``, ``codir`` with in-batch negatives...).
Evaluation: the mean cosine similarity of student and teacher sentence embeddings on held-out text (the
teacher's pooling, ``evaluation.pooling``; when both have the same width), and, at the end, a linear probe
of frozen embeddings of both models on a labelled data set (``evaluation.probe``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.data import Collator, TaskData, load_task_data
from distillkit.objective.terms import TaskInfo, masked_mean
from distillkit.tasks.base import (
    Autocast,
    Batch,
    EvalContext,
    ReportContext,
    Task,
    autocast_scope,
    model_inputs,
    on_device,
)
from distillkit.tasks.examples import PER_EXAMPLE, accuracy_of_predictions, mean_of, to_lists
from distillkit.text_data import load_text_data


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module,
    batches: Iterable[Batch],
    pooling: str,
    autocast: Autocast | None = None,
) -> torch.Tensor:
    """Pooled last hidden states ``[N, H]`` (float32) of every example of ``batches``."""
    was_training = model.training
    model.eval()
    vectors = []
    for batch in batches:
        with autocast_scope(autocast):
            hidden = model(**model_inputs(batch)).last_hidden_state.float()
        pooled = hidden[:, 0] if pooling == "cls" else masked_mean(hidden, batch["attention_mask"])
        vectors.append(pooled)
    model.train(was_training)
    return torch.cat(vectors)


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor, classes: int
) -> float:
    """Accuracy of a multinomial logistic regression trained on frozen features (:func:`probe_predictions`).

    Args:
        train_x: ``[N, H]`` training features.
        train_y: ``[N]`` class indices.
        eval_x: ``[M, H]`` held-out features.
        eval_y: ``[M]`` class indices.
        classes: Number of classes.

    Returns:
        Held-out accuracy.

    """
    predicted = probe_predictions(train_x, train_y, eval_x, classes)
    return float((predicted == eval_y).double().mean())


def probe_predictions(
    train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, classes: int
) -> torch.Tensor:
    """Predicted classes ``[M]`` of a multinomial logistic regression trained on frozen features.

    Features are standardised with the training statistics; the regression (L2 penalty 1e-3) is fitted by
    full-batch L-BFGS in float64, deterministically.

    Args:
        train_x: ``[N, H]`` training features.
        train_y: ``[N]`` class indices.
        eval_x: ``[M, H]`` held-out features.
        classes: Number of classes.

    Returns:
        ``[M]`` int64 class indices.

    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x, xe = ((train_x - mean) / std).double(), ((eval_x - mean) / std).double()
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, train_y) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (xe @ weight + bias).argmax(-1)


NO_PROBE = (
    "no linear probe (probe acc -): set evaluation.probe to a labelled data set to score both models' "
    "embeddings (docs/tasks.md)"
)


class Representation(Task):
    """Task-agnostic encoder distillation: no labels, no head; embedding cosine and a linear probe."""

    name = "representation"
    info = TaskInfo(name="representation", labels=None, logits=None)
    metric = "probe_accuracy"
    metrics = ("probe_accuracy", "cosine")
    example_metrics = {"probe_accuracy": accuracy_of_predictions("probe"), "cosine": mean_of("cosine")}

    @classmethod
    def run_metrics(cls, summary: dict[str, Any], model: str = "student") -> dict[str, float]:
        """Embedding cosine with the teacher (student only) and linear-probe accuracy (when probed)."""
        held_out = summary[model].get("eval") or {}
        found = {"cosine": float(held_out["cosine"])} if "cosine" in held_out else {}
        probe = summary.get("probe", {}).get("accuracy", {})
        if model in probe:
            found["probe_accuracy"] = float(probe[model])
        return found

    def load_data(self, tokenizer: Any) -> TaskData:
        """One truncated text per example (``data.text_column``)."""
        return load_text_data(self.config.data, tokenizer, bool(self.config.data.packing))

    def collator(self, tokenizer: Any) -> Callable:
        """Dynamic padding."""
        return Collator(tokenizer)

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], context: EvalContext) -> dict[str, Any]:
        """Mean cosine between the model's and the teacher's sentence embeddings (same width only).

        With ``context.per_example``: ``example_id`` and ``cosine`` per example (when there is a cosine).
        """
        batches = list(on_device(batches, context.accelerator))
        pooling = self.config.evaluation.pooling
        mine = sentence_embeddings(model, batches, pooling, context.autocast)
        metrics: dict[str, Any] = {"examples": len(mine)}
        teacher = context.teacher
        if teacher is not None and teacher is not model:
            theirs = sentence_embeddings(teacher, batches, pooling, context.autocast)
            if theirs.shape[1] == mine.shape[1]:
                cosine = F.cosine_similarity(mine, theirs, dim=-1)
                metrics["cosine"] = float(cosine.mean())
                if context.per_example:
                    ids = torch.cat([b["example_ids"] for b in batches])
                    metrics[PER_EXAMPLE] = {"eval": to_lists({"example_id": ids, "cosine": cosine})}
        return metrics

    def describe(self, metrics: dict[str, float]) -> str:
        """``cosine 0.93``."""
        return (
            f"embedding cosine {metrics['cosine']:.4f}"
            if "cosine" in metrics
            else "no cosine (widths differ)"
        )

    def report(self, context: ReportContext) -> dict[str, Any]:
        """Linear-probe accuracy of frozen student and teacher embeddings on ``evaluation.probe``."""
        probe_cfg = self.config.evaluation.probe
        if probe_cfg is None:
            return {}
        probe = load_task_data(probe_cfg, context.tokenizer)
        pad = Collator(context.tokenizer)
        pooling = self.config.evaluation.pooling

        def features(model: nn.Module, rows: Any) -> torch.Tensor:
            batches = [
                pad([rows[i] for i in range(s, min(s + 64, len(rows)))]) for s in range(0, len(rows), 64)
            ]
            on_it = on_device(batches, context.accelerator)
            return sentence_embeddings(model, on_it, pooling, context.autocast).cpu()

        train_y = torch.tensor(probe.train["labels"])
        eval_y = torch.tensor(probe.eval["labels"])
        predicted = {
            name: probe_predictions(
                features(m, probe.train), train_y, features(m, probe.eval), probe.num_labels
            )
            for name, m in context.models
        }
        report: dict[str, Any] = {
            "probe": {
                "accuracy": {name: float((p == eval_y).double().mean()) for name, p in predicted.items()},
                "train_examples": len(train_y),
                "eval_examples": len(eval_y),
                "data": probe_cfg.path,
            }
        }
        if self.config.evaluation.predictions:
            columns = {"example_id": torch.arange(len(eval_y)), "label": eval_y, "pred": predicted["student"]}
            report[PER_EXAMPLE] = {"probe": to_lists(columns)}
        return report

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        """Embedding cosine, probe accuracy and parameters."""
        lines = [f"{'':10} {'probe acc':>9} {'params':>12}"]
        probe = summary.get("probe", {}).get("accuracy", {})
        for name in ("teacher", "student"):
            accuracy = f"{probe[name]:9.4f}" if name in probe else f"{'-':>9}"
            lines.append(f"{name:10} {accuracy} {summary[name]['parameters']:12,}")
        cosine = summary["student"]["eval"].get("cosine")
        if cosine is not None:
            lines.append(
                f"student-teacher embedding cosine on {summary['eval_examples']} held-out texts: {cosine:.4f}"
            )
        if "probe" in summary:
            p = summary["probe"]
            lines.append(
                f"linear probe: {p['data']}, {p['train_examples']} train / {p['eval_examples']} "
                "held-out examples"
            )
        else:
            lines.append(NO_PROBE)
        return lines
