"""Tasks: what a run trains on and how it is evaluated (``task:`` in a config)."""

from __future__ import annotations

from distillkit.config import DistillConfig
from distillkit.tasks.base import EvalContext, ReportContext, Task
from distillkit.tasks.causal_lm import CausalLM
from distillkit.tasks.classification import SequenceClassification
from distillkit.tasks.masked_lm import MaskedLM
from distillkit.tasks.representation import Representation

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (SequenceClassification, CausalLM, MaskedLM, Representation)
}
"""Task name -> class."""


def make_task(config: DistillConfig) -> Task:
    """Returns the task object of a run config."""
    return TASKS[config.task](config)


__all__ = [
    "TASKS",
    "CausalLM",
    "EvalContext",
    "MaskedLM",
    "ReportContext",
    "Representation",
    "SequenceClassification",
    "Task",
    "make_task",
]
