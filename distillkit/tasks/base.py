"""The task contract: what data a run trains on, which model head it uses, how it is evaluated and reported.

A task never changes the losses' code: it tells the objective what the batches carry (:class:`TaskInfo`),
and the objective refuses terms that cannot work on it before any model loads.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from distillkit.config import DistillConfig
from distillkit.data import TaskData
from distillkit.objective.taps import MODEL_INPUTS
from distillkit.objective.terms import TaskInfo
from distillkit.tasks.examples import ExampleMetric

Autocast = Callable[[], Any]
"""A factory of the mixed-precision context: ``with autocast(): ...``."""

Batch = dict[str, torch.Tensor]
"""One collated batch: ``input_ids [B, T]``, ``attention_mask [B, T]``, task-specific keys (``labels``)."""


@dataclass(frozen=True, kw_only=True)
class EvalContext:
    """What an evaluation needs besides the model and the held-out batches.

    Attributes:
        accelerator: Moves each batch to its ``device``; None leaves the batches where they are.
        autocast: Enters mixed precision around each forward; None runs in the models' own precision.
        teacher: The frozen teacher, for metrics that compare the model with it (agreement, embedding
            cosine); None when only the model itself is scored (e.g. when the teacher is the model).
        per_example: Also return the per-example columns the metrics are computed from, under
            :data:`~distillkit.tasks.examples.PER_EXAMPLE` (a study keeps them for its bootstrap).

    """

    accelerator: Any = None
    autocast: Autocast | None = None
    teacher: nn.Module | None = None
    per_example: bool = False


@dataclass(frozen=True, kw_only=True)
class ReportContext:
    """What a task's end-of-run :meth:`Task.report` may use.

    Attributes:
        student: The trained student.
        teacher: The frozen teacher.
        data: The run's tokenised train/eval splits (``data.eval`` rows are dicts of token lists).
        collator: Turns a list of rows into a batch of ``[B, T]`` tensors.
        tokenizer: The run's (the teacher's) tokenizer (decoding samples, tokenising probe data).
        accelerator: Its ``device`` is where the models are.
        autocast: Enters the run's mixed precision.
        student_tokenizer: The student's tokenizer (None: ``tokenizer``; it is another one in a
            cross-tokenizer run, where batches carry the teacher's tokens under ``teacher_`` keys).

    """

    student: nn.Module
    teacher: nn.Module
    data: TaskData
    collator: Callable[[list[dict[str, Any]]], Batch]
    tokenizer: Any
    accelerator: Any
    autocast: Autocast
    student_tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.student_tokenizer is None:
            object.__setattr__(self, "student_tokenizer", self.tokenizer)

    @property
    def models(self) -> tuple[tuple[str, nn.Module], tuple[str, nn.Module]]:
        """``(("teacher", teacher), ("student", student))``, in the order reports list them."""
        return (("teacher", self.teacher), ("student", self.student))

    def eval_batches(self, examples: int, batch: int = 32) -> list[Batch]:
        """Collated batches of the first ``examples`` held-out rows, on the accelerator's device."""
        return first_batches(self.data.eval, self.collator, self.accelerator, examples, batch)


class Task:
    """One kind of distillation run.

    Subclasses set ``name``, ``info`` and ``metric`` and implement the data, collation and evaluation.

    Args:
        config: The run config.

    """

    name: ClassVar[str] = ""
    info: ClassVar[TaskInfo]
    metric: ClassVar[str] = "loss"
    """The headline evaluation metric (the study compares by it unless told otherwise)."""
    metrics: ClassVar[tuple[str, ...]] = ("loss",)
    """Every metric :meth:`student_metrics` reads from a run's summary."""
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss", "perplexity"})
    """Metrics where a smaller value is the better one."""
    example_metrics: ClassVar[dict[str, ExampleMetric]] = {}
    """The metrics of :attr:`metrics` that can be recomputed from per-example columns, and how."""
    cross_tokenizer: ClassVar[bool] = False
    """The task can train a student whose tokenizer differs from the teacher's: :meth:`load_data` and
    :meth:`collator` then take the teacher's tokenizer too, and batches carry the teacher's tokens of the
    same text under ``teacher_`` keys (see :func:`distillkit.objective.taps.teacher_view`)."""

    def __init__(self, config: DistillConfig) -> None:
        self.config = config

    def load_data(self, tokenizer: Any) -> TaskData:
        """Loads, validates and tokenises the training and evaluation data.

        Args:
            tokenizer: The student's tokenizer (the teacher's too, unless the task is :attr:`cross_tokenizer`
                and its ``load_data`` is given the teacher's as ``teacher_tokenizer``).

        """
        raise NotImplementedError

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Returns the function that turns a list of rows into a batch (``teacher_tokenizer`` as above)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], context: EvalContext) -> dict[str, float]:
        """Evaluates ``model`` on held-out batches.

        Args:
            model: The model to score (student, or the teacher itself).
            batches: Collated held-out batches (on any device; ``context.accelerator`` moves them).
            context: Accelerator, mixed precision and the teacher to compare with (if any).

        Returns:
            Metric name -> value (counts such as ``examples`` or ``positions`` included); with
            ``context.per_example``, also ``PER_EXAMPLE: {"eval": {column: [value per example]}}``
            (:mod:`distillkit.tasks.examples`).

        """
        raise NotImplementedError

    @classmethod
    def run_metrics(cls, summary: dict[str, Any], model: str = "student") -> dict[str, float]:
        """One model's scalar metrics (those of :attr:`metrics` it has) from a run's ``summary.json``.

        Args:
            summary: The run's summary.
            model: ``student`` or ``teacher``.

        """
        held_out = summary[model].get("eval") or {}
        return {name: float(held_out[name]) for name in cls.metrics if name in held_out}

    def describe(self, metrics: dict[str, float]) -> str:
        """A one-line rendering of evaluation metrics for the progress output."""
        return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))

    def report(self, context: ReportContext) -> dict[str, Any]:
        """Extra summary entries computed once after training (main process only).

        Args:
            context: Both models, the data and what is needed to run them.

        Returns:
            Entries merged into the run's ``summary.json`` (none by default).

        """
        return {}

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        """The lines printed at the end of a run."""
        raise NotImplementedError


def on_device(batches: Iterable[Batch], accelerator: Any) -> Iterator[Batch]:
    """Moves each batch to the accelerator's device (no-op without one)."""
    for batch in batches:
        yield batch if accelerator is None else {k: v.to(accelerator.device) for k, v in batch.items()}


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The keys of ``batch`` a model's forward takes (:data:`distillkit.objective.taps.MODEL_INPUTS`)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def autocast_scope(autocast: Autocast | None):
    """Enters ``autocast()`` when given, else nothing."""
    return autocast() if autocast is not None else nullcontext()


@torch.no_grad()
def time_forward(model: nn.Module, batches: list[Batch], repeats: int = 5) -> float:
    """Median seconds of one pass of ``model`` over ``batches``, after a warm-up pass.

    Measured as a benchmark is: eval mode, one untimed warm-up pass, then ``repeats`` timed passes; the
    median is robust to a noisy machine.

    Args:
        model: The model.
        batches: Input batches on the model's device.
        repeats: Timed passes.

    Returns:
        Median wall-clock seconds per pass.

    """
    was_training = model.training
    model.eval()
    inputs = [model_inputs(b) for b in batches]
    cuda = torch.cuda.is_available()

    def one_pass() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in inputs:
            model(**batch)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    one_pass()
    seconds = statistics.median(one_pass() for _ in range(repeats))
    model.train(was_training)
    return seconds


def first_batches(
    data: Any, collator: Callable, accelerator: Any, examples: int, batch: int = 32
) -> list[dict]:
    """Collated batches of the first ``examples`` rows of ``data``, on the accelerator's device."""
    rows = min(len(data), examples)
    return [
        {
            k: v.to(accelerator.device)
            for k, v in collator([data[i] for i in range(s, min(s + batch, rows))]).items()
        }
        for s in range(0, rows, batch)
    ]
