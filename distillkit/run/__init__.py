"""Training: a :class:`Run` built once from a config, the loop that trains it, and the commands on top.

- :mod:`~distillkit.run.run`: :class:`Run` (task, tokenizer, data, collator, objective, teachers, student,
  accelerator), built in two stages (no weights, then weights);
- :mod:`~distillkit.run.loop`: :class:`TrainingLoop` / :func:`fit`, one optimizer step in five phases, with
  :class:`Callback` events; :mod:`~distillkit.run.step` the pieces of a step, :mod:`~distillkit.run.phases`
  its timer, :mod:`~distillkit.run.checkpoint` and :mod:`~distillkit.run.runlog` what it writes;
- :mod:`~distillkit.run.teachers`: teachers as given, fine-tuned once, or read from a cache;
- :mod:`~distillkit.run.distill` and :mod:`~distillkit.run.cache_teacher`: the ``distill`` and
  ``cache-teacher`` commands.
"""

from distillkit.run.callbacks import Callback
from distillkit.run.distill import distill
from distillkit.run.loop import FitResult, TrainingLoop, fit
from distillkit.run.run import Run
from distillkit.run.step import NonFiniteLossError

__all__ = ["Callback", "FitResult", "NonFiniteLossError", "Run", "TrainingLoop", "distill", "fit"]
