"""``sequence_classification``: a labelled text-classification task (the teacher may be fine-tuned first)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from distillkit.data import Collator, TaskData, load_task_data
from distillkit.objective.terms import TaskInfo
from distillkit.tasks.base import Batch, EvalContext, ReportContext, Task, time_forward
from distillkit.tasks.evaluate_classification import evaluate
from distillkit.tasks.examples import accuracy_of_predictions, macro_f1, mean_of


class SequenceClassification(Task):
    """Sequence classification: ``[B, C]`` logits, ``[B]`` labels; accuracy, macro-F1 and loss."""

    name = "sequence_classification"
    info = TaskInfo(name="sequence_classification", labels="class", logits="class")
    metric = "accuracy"
    metrics = ("accuracy", "f1", "loss")
    example_metrics = {"accuracy": accuracy_of_predictions(), "f1": macro_f1(), "loss": mean_of("nll")}

    def load_data(self, tokenizer: Any) -> TaskData:
        """Labelled rows (``data.text_column``, ``data.label_column``) tokenised and checked."""
        return load_task_data(self.config.data, tokenizer)

    def collator(self, tokenizer: Any) -> Callable:
        """Dynamic padding."""
        return Collator(tokenizer)

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], context: EvalContext) -> dict[str, Any]:
        """Accuracy, macro-F1, mean cross-entropy and the number of examples (no teacher metric)."""
        num_labels = model.config.num_labels
        return evaluate(
            model, batches, num_labels, context.accelerator, context.autocast, per_example=context.per_example
        )

    def describe(self, metrics: dict[str, float]) -> str:
        """``accuracy 0.75 f1 0.74 loss 0.52``."""
        return f"accuracy {metrics['accuracy']:.4f} f1 {metrics['f1']:.4f} loss {metrics['loss']:.4f}"

    def report(self, context: ReportContext) -> dict[str, Any]:
        """Inference time of both models on up to 128 held-out examples (median of 5 passes)."""
        batches = context.eval_batches(128)
        with context.autocast():
            teacher_s = time_forward(context.teacher, batches)
            student_s = time_forward(context.student, batches)
        return {
            "inference": {
                "examples": sum(len(b["input_ids"]) for b in batches),
                "teacher_seconds": teacher_s,
                "student_seconds": student_s,
                "speedup": teacher_s / student_s if student_s > 0 else math.nan,
                "method": "median of 5 timed passes after 1 warm-up pass",
            }
        }

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        """Accuracy, macro-F1 and parameters of both models, and the inference speed-up."""
        teacher, student = summary["teacher"], summary["student"]
        lines = [
            f"{'':10} {'accuracy':>9} {'macro-F1':>9} {'params':>12}",
            *(
                f"{name:10} {part['eval']['accuracy']:9.4f} {part['eval']['f1']:9.4f} "
                f"{part['parameters']:12,}"
                for name, part in (("teacher", teacher), ("student", student))
            ),
            f"held-out examples: {summary['eval_examples']}  (trained on {summary['train_examples']})",
        ]
        if "inference" in summary:
            inf = summary["inference"]
            lines.append(
                f"inference on {inf['examples']} examples ({inf['method']}): teacher "
                f"{inf['teacher_seconds']:.3f}s, student {inf['student_seconds']:.3f}s, "
                f"speed-up x{inf['speedup']:.2f}"
            )
        return lines
