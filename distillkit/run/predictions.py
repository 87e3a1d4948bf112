"""The student's per-example predictions at the end of a run (``evaluation.predictions``).

``<output_dir>/predictions.json`` holds, per example set (``eval``: the evaluation split; ``probe``: a
representation task's linear probe), the name of the examples it scored and the task's per-example columns
(:mod:`distillkit.tasks.examples`)::

    {"eval": {"examples": "eval/fold-2-of-5", "columns": {"example_id": [...], "label": [...], ...}}}

Runs whose sets have the same ``examples`` name scored the same examples: a study pairs them example by
example in its bootstrap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillkit.config import DistillConfig
from distillkit.run.loaders import eval_loader
from distillkit.run.run import Run
from distillkit.tasks import EvalContext
from distillkit.tasks.examples import PER_EXAMPLE

PREDICTIONS_FILE = "predictions.json"


def example_set_name(config: DistillConfig, source: str) -> str:
    """The name of the examples set ``source`` of a run scores (``eval``, ``dev``, ``eval/fold-2-of-5``)."""
    if source != "eval":
        return source
    data = config.data
    name = "dev" if data.evaluate_on == "dev" else "eval"
    return f"{name}/fold-{data.fold}-of-{data.folds}" if data.folds else name


def evaluate_examples(run: Run, autocast: Any) -> dict[str, dict[str, list]]:
    """Scores the trained student once more, keeping every example's columns (every process takes part).

    Returns:
        ``{"eval": {column: [value per example]}}``.

    """
    context = EvalContext(
        accelerator=run.accelerator, autocast=autocast, teacher=run.teacher, per_example=True
    )
    return run.task.evaluate(run.student, eval_loader(run), context).get(PER_EXAMPLE, {})


def write_predictions(directory: Path, config: DistillConfig, sets: dict[str, dict[str, list]]) -> Path:
    """Writes ``predictions.json`` (see the module docstring) into ``directory``; returns its path."""
    payload = {
        source: {"examples": example_set_name(config, source), "columns": columns}
        for source, columns in sets.items()
    }
    path = Path(directory) / PREDICTIONS_FILE
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path
