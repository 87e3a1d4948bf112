"""The parts of ``distillkit.hf.DistillationTrainer`` that hold no Trainer logic of their own.

- :class:`TermMeans`: each term's loss summed on the device over a logging window, read once per record;
- :class:`DistillationOutput`: what ``compute_loss(..., return_outputs=True)`` gives with the loss;
- :func:`trainer_card`: the student's model card from a trainer's models, objective, data and log history.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.modelcard import (
    extract_hyperparameters_from_trainer,
    make_markdown_table,
    parse_log_history,
)
from transformers.utils import ModelOutput

from distillkit.models import count_parameters
from distillkit.objective.objective import ObjectiveOutput
from distillkit.objective.teachers import DEFAULT_TEACHER
from distillkit.run.given_models import model_task
from distillkit.run.model_card import PIPELINE_TAGS, CardInfo, describe_objective, hub_name, scalar_metrics

_EVAL_ONLY = {"runtime", "samples_per_second", "steps_per_second"}


@dataclasses.dataclass
class DistillationOutput(ModelOutput):
    """What ``compute_loss(..., return_outputs=True)`` gives with the loss: the student's logits, if built.

    Attributes:
        loss: The objective's weighted total (scalar).
        logits: The student's ``[B, C]`` or ``[B, T, V]`` logits; None when the terms read the output layers.

    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class TermMeans:
    """Weighted sums of the objective's terms, kept on the device and read once per log record."""

    def __init__(self) -> None:
        self.labels: list[str] = []
        self.sums: torch.Tensor | None = None
        self.weight = 0.0

    def add(self, output: ObjectiveOutput, weight: float) -> None:
        """Adds ``weight ×`` each term of one micro-batch."""
        values = torch.stack([value.detach().float() for value in output.terms.values()]) * weight
        self.sums = values if self.sums is None else self.sums + values
        self.labels, self.weight = list(output.terms), self.weight + weight

    def pop(self, accelerator: Any) -> dict[str, float]:
        """Each term's weighted mean since the last call (averaged over processes), then starts afresh.

        Every process must call it (it is a collective when there are several).
        """
        if self.sums is None or self.weight <= 0:
            return {}
        means = self.sums / self.weight
        if accelerator.num_processes > 1:
            means = accelerator.reduce(means, reduction="mean")
        values = dict(zip(self.labels, means.tolist(), strict=True))
        self.sums, self.weight = None, 0.0
        return values


def trainer_card(
    trainer: Any,
    model_name: str,
    finetuned_from: str | None = None,
    dataset: str | list[str] | None = None,
    tags: str | list[str] | None = None,
) -> CardInfo:
    """What the student's model card says, from a ``DistillationTrainer``'s models, objective, data and logs.

    Args:
        trainer: The trainer (``model``, ``teachers``, ``objective``, ``teacher_metrics``, ``state``).
        model_name: The card's title.
        finetuned_from: The ``base_model``; default: the main teacher's hub name, when it has one.
        dataset: The training data's name(s); a single hub name also goes into ``datasets``/``model-index``.
        tags: More tags.

    """
    objective, teachers = trainer.objective, trainer.teachers
    names = {
        name: getattr(getattr(model, "config", None), "_name_or_path", "") for name, model in teachers.items()
    }
    sources = {
        name: names[name] or f"a {type(model).__name__} built in Python" for name, model in teachers.items()
    }
    main = objective.default_teacher if objective.default_teacher in teachers else DEFAULT_TEACHER
    datasets = [dataset] if isinstance(dataset, str) else list(dataset or [])
    history = trainer.state.log_history
    last_eval = next((r for r in reversed(history) if "eval_loss" in r), {})
    last_train = next((r for r in reversed(history) if "loss" in r), {})
    evaluated = {k[len("eval_") :]: v for k, v in last_eval.items() if k.startswith("eval_")}
    parameters = {"student": count_parameters(trainer.model)}
    if main in teachers:
        parameters["teacher"] = count_parameters(teachers[main])
    found = model_task(trainer.model)
    _, eval_lines, _ = parse_log_history(history)
    train_dataset = trainer.train_dataset
    return CardInfo(
        model_name=model_name,
        teachers=sources,
        objective=describe_objective(objective),
        base_model=finetuned_from or hub_name(names.get(main)),
        pipeline_tag=PIPELINE_TAGS.get(found[0]) if found else None,
        data={
            key: value
            for key, value in (
                ("name", ", ".join(datasets)),
                ("train_examples", len(train_dataset) if hasattr(train_dataset, "__len__") else None),
            )
            if value
        },
        dataset_id=hub_name(datasets[0]) if len(datasets) == 1 else None,
        student_metrics=scalar_metrics({k: v for k, v in evaluated.items() if k not in _EVAL_ONLY}),
        teacher_metrics=scalar_metrics(trainer.teacher_metrics),
        parameters=parameters,
        training=extract_hyperparameters_from_trainer(trainer),
        final_losses={k: v for k, v in last_train.items() if k == "loss" or k.startswith("loss_")},
        results_table=make_markdown_table(eval_lines) if eval_lines else None,
        tags=[tags] if isinstance(tags, str) else list(tags or []),
    )
