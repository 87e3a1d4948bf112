"""An objective for models given in Python (``distillkit.hf``): built for their sizes, checked against them.

A config run sizes its objective from model configs and checks it against the task before any weights load
(:mod:`~distillkit.run.run`). A user who hands a student, teachers and an objective to a ``Trainer`` gets the
same: :func:`objective_for_models` builds the objective from term dicts (or takes one built in Python) for
the models' sizes, and :func:`check_models` reports the mistakes one can make (no teacher, a teacher with
another vocabulary, terms reading outputs a model cannot give) in one sentence naming the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

from distillkit.config import safe_load_yaml
from distillkit.errors import ConfigError
from distillkit.objective.objective import DistillationObjective
from distillkit.objective.teachers import DEFAULT_TEACHER
from distillkit.objective.terms import ModelDims, TaskInfo

_TASKS = (
    ("causal_lm", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, TaskInfo("causal_lm", "token", "token")),
    ("masked_lm", MODEL_FOR_MASKED_LM_MAPPING_NAMES, TaskInfo("masked_lm", "token", "token")),
    (
        "sequence_classification",
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        TaskInfo("sequence_classification", "class", "class"),
    ),
    ("representation", MODEL_MAPPING_NAMES, TaskInfo("representation", None, None)),
)


def _names(mapping: Mapping[str, Any]) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def base_model_of(model: nn.Module) -> nn.Module:
    """The model under an adapter wrapper (PEFT's ``get_base_model()``), else the model itself."""
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) and getattr(model, "peft_config", None) is not None else model


def model_task(model: nn.Module) -> tuple[str, TaskInfo] | None:
    """The distillkit task a Hugging Face model's head does, from its class, or None when unknown."""
    name = type(base_model_of(model)).__name__
    for task, mapping, info in _TASKS:
        if name in _names(mapping):
            return task, info
    return None


def teachers_by_name(
    teacher: nn.Module | Mapping[str, nn.Module] | None, default: str
) -> dict[str, nn.Module]:
    """Teacher name -> model: ``{}`` for None, ``{default: teacher}`` for one model, the mapping as it is."""
    if teacher is None:
        return {}
    if isinstance(teacher, nn.Module):
        return {default: teacher}
    if isinstance(teacher, Mapping) and all(isinstance(m, nn.Module) for m in teacher.values()):
        return dict(teacher)
    raise ConfigError(f"teacher must be a model or {{name: model}}, got {type(teacher).__name__}")


def objective_for_models(
    objective: DistillationObjective | Sequence[Mapping[str, Any]] | str,
    student: nn.Module,
    teacher: nn.Module | Mapping[str, nn.Module] | None,
    train_examples: int | None = None,
) -> DistillationObjective:
    """Builds the objective for the models' sizes, or returns one built in Python as it is.

    Args:
        objective: A :class:`DistillationObjective`, the ``objective:`` list of a config as dicts
            (``[{loss: kd, weight: 1.0, temperature: 2.0}, ...]``), or that list as YAML text.
        student: The student.
        teacher: The teacher, ``{name: teacher}``, or None.
        train_examples: The number of training examples (index-keyed memory banks default to it).

    Raises:
        ConfigError: For a bad term, parameter or layer map, naming the term.

    """
    if isinstance(objective, DistillationObjective):
        return objective
    if isinstance(objective, str):
        objective = safe_load_yaml(objective, source="objective")
    if isinstance(objective, Mapping) or not isinstance(objective, Sequence):
        raise ConfigError("objective must be a list of terms, e.g. [{'loss': 'kd', 'weight': 1.0}]")
    if isinstance(teacher, Mapping):
        dims: ModelDims | dict[str, ModelDims] = {
            name: ModelDims.from_models(student, model, train_examples) for name, model in teacher.items()
        }
    else:  # without a teacher, terms that read none can still be built (those that read one are refused)
        dims = ModelDims.from_models(student, teacher if teacher is not None else student, train_examples)
    return DistillationObjective.from_config(list(objective), dims)


def output_size(model: nn.Module) -> int | None:
    """The size of the model's logits' last dimension: its vocabulary, or its number of classes."""
    getter = getattr(model, "get_output_embeddings", None)
    weight = getattr(getter() if callable(getter) else None, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    found = model_task(model)
    if found is not None and found[0] == "sequence_classification":
        return int(model.config.num_labels)
    return None


def check_models(
    objective: DistillationObjective, student: nn.Module, teachers: Mapping[str, nn.Module]
) -> None:
    """Refuses a student/teachers/objective combination that cannot train, before the first step.

    Raises:
        ConfigError: When a term reads a teacher that was not given, a teacher shares the student's weights,
            the objective was built for other sizes, a logit-reading term compares models with different
            vocabularies (or label sets), or a term reads outputs the student's kind of model cannot give.

    """
    for name, request in objective.teacher_requests().items():
        if not request.needs_forward or name in teachers:
            continue
        readers = [label for label in objective.terms if name in objective.term_teachers[label].names]
        if not teachers:
            raise ConfigError(
                f"objective term(s) {', '.join(readers)} read the teacher, but no teacher was given: pass "
                "teacher=model (or {name: model})"
            )
        raise ConfigError(
            f"objective term(s) {', '.join(readers)} read teacher '{name}', which is not among the teachers "
            f"given ({', '.join(teachers)}); name it in teacher={{'{name}': model, ...}}"
        )
    student_ids = {id(p) for p in student.parameters()}
    for name, model in teachers.items():
        if student_ids & {id(p) for p in model.parameters()}:
            raise ConfigError(f"teacher '{name}' shares weights with the student; give a separate model")
    _check_sizes(objective, student, teachers)
    _check_vocabularies(objective, student, teachers)
    found = model_task(student)
    if found is not None:
        objective.check_task(found[1])


def _check_sizes(
    objective: DistillationObjective, student: nn.Module, teachers: Mapping[str, nn.Module]
) -> None:
    for label, term in objective.terms.items():
        model = teachers.get(objective.term_teachers[label].names[0])
        if model is None:
            continue
        actual = ModelDims.from_models(student, model)
        expected = dataclasses.replace(term.dims, train_examples=None)
        if actual != expected:
            raise ConfigError(
                f"objective term '{label}' was built for {expected}, but the models are {actual}; build "
                "the objective for these models (ModelDims.from_models(student, teacher)) or give it as dicts"
            )


def _check_vocabularies(
    objective: DistillationObjective, student: nn.Module, teachers: Mapping[str, nn.Module]
) -> None:
    readers = objective.logit_readers()
    if not readers["student"]:
        return
    size = output_size(student)
    for name in readers["teachers"]:
        other = output_size(teachers[name]) if name in teachers else None
        if None not in (size, other) and size != other:
            who = "the teacher" if name == DEFAULT_TEACHER else f"teacher '{name}'"
            raise ConfigError(
                f"objective term(s) {', '.join(readers['terms'])} compare logits, but the student has {size} "
                f"outputs and {who} {other}: a teacher with another vocabulary (or label set) cannot be "
                "compared token by token; use a teacher that shares the student's tokenizer, or only "
                "hidden-state terms (l2, cosine, codir)"
            )
