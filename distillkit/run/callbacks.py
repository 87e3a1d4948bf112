"""Callbacks: code of one's own that runs at the loop's events, in the manner of the Hugging Face Trainer's.

Subclass :class:`Callback` and override the events of interest; pass instances to
:func:`~distillkit.run.loop.fit` or :class:`~distillkit.run.loop.TrainingLoop`. Each event receives the loop
(``loop.run``, ``loop.step_count``, ``loop.student``, ``loop.objective``, ``loop.optimizer``...)::

    class PrintEvery100(Callback):
        def on_log(self, loop, record):
            if loop.step_count % 100 == 0:
                print(loop.step_count, record["total"])

Callbacks observe; changing the run's state from one is at the caller's risk (a resumed run does not
replay it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distillkit.run.loop import FitResult, TrainingLoop
    from distillkit.run.step import StepValues


class Callback:
    """Does nothing at every event; override the ones you need."""

    def on_train_begin(self, loop: TrainingLoop) -> None:
        """After resuming (if asked) and before the first step of this call."""

    def on_step_end(self, loop: TrainingLoop, values: StepValues) -> None:
        """After each optimizer step (applied or skipped), before its log record, evaluation and save."""

    def on_log(self, loop: TrainingLoop, record: dict[str, Any]) -> None:
        """After each training record (mean losses, ``lr``, ``grad_norm``, ``seconds``) is written."""

    def on_evaluate(self, loop: TrainingLoop, metrics: dict[str, float]) -> None:
        """After an evaluation, with its metrics."""

    def on_save(self, loop: TrainingLoop, path: Path | None) -> None:
        """After a checkpoint is written (``path`` is None on processes other than the main one)."""

    def on_train_end(self, loop: TrainingLoop, result: FitResult) -> None:
        """When the loop returns its result."""


class CallbackList:
    """Several callbacks, told of each event in order."""

    EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks must be Callback instances, got {type(callback).__name__}")
        self.callbacks = list(callbacks)

    def emit(self, event: str, *args: Any) -> None:
        """Calls ``event`` (one of :attr:`EVENTS`) of every callback with ``args``."""
        for callback in self.callbacks:
            getattr(callback, event)(*args)
