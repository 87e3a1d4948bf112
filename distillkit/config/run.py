"""A whole run: task, models, objective, data, training and evaluation settings (:class:`DistillConfig`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distillkit.config.base import Strict
from distillkit.config.data import DataConfig, EvaluationConfig
from distillkit.config.models import ModelConfig
from distillkit.config.terms import TermConfig
from distillkit.config.train import TrainConfig
from distillkit.errors import close_matches


class DistillConfig(Strict):
    """A whole ``distillkit distill`` run (``task`` decides the models' heads, data and evaluation)."""

    task: Literal["sequence_classification", "causal_lm", "masked_lm", "representation"] = (
        "sequence_classification"
    )
    student: ModelConfig
    teacher: ModelConfig
    teachers: dict[str, ModelConfig] = Field(default_factory=dict)
    objective: list[TermConfig] = Field(min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output_dir: str = "runs/distill"

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_is_list(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            raise ValueError("objective must be a list of terms, e.g. [{loss: kd, weight: 1.0}]")
        return value

    @model_validator(mode="after")
    def _teacher_has_source(self) -> DistillConfig:
        if self.teacher.path is None and self.teacher.config is None:
            raise ValueError("teacher needs `path` (local directory or hub name) or `config`")
        if self.teacher.layers is not None or self.teacher.hidden_size is not None:
            raise ValueError("`layers` and `hidden_size` are student options; set them under student")
        if self.student.finetune is not None:
            raise ValueError("`finetune` is a teacher option; set it under teacher")
        if self.student.cache is not None or self.student.cache_top_k is not None:
            raise ValueError("`cache` and `cache_top_k` are teacher options; set them under teacher")
        self._check_teachers()
        if self.teacher.finetune is not None and self.task != "sequence_classification":
            raise ValueError(
                f"teacher.finetune fine-tunes a classifier; task '{self.task}' distils the teacher as it is"
            )
        student = self.student
        if all(v is None for v in (student.path, student.config, student.layers, student.hidden_size)):
            raise ValueError(
                "student needs `path`, `config`, or `layers`/`hidden_size` (built from the teacher)"
            )
        return self

    def _check_teachers(self) -> None:
        if "teacher" in self.teachers:
            raise ValueError("'teacher' names the main teacher (`teacher:`); give the others other names")
        for name, spec in self.teachers.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"teacher name '{name}' may only use letters, digits and _ . -")
            if spec.path is None and spec.config is None:
                raise ValueError(f"teachers.{name} needs `path` or `config`")
            if spec.layers is not None or spec.hidden_size is not None:
                raise ValueError(f"teachers.{name}: `layers` and `hidden_size` are student options")
        if self.task == "masked_lm" and any(s.cache for s in self.teacher_specs().values()):
            raise ValueError(
                "task 'masked_lm' masks the inputs anew in every batch, so the teacher's outputs cannot be "
                "cached; remove teacher.cache"
            )
        known = ["teacher", *self.teachers]
        for index, term in enumerate(self.objective):
            for name in term.teacher_names():
                if name not in known:
                    hint = close_matches(name, known)
                    raise ValueError(
                        f"objective.{index} ({term.loss}) reads teacher '{name}'{hint}, "
                        f"which is not defined; teachers: {', '.join(known)} (add it under `teachers:`)"
                    )

    def teacher_specs(self) -> dict[str, ModelConfig]:
        """Every teacher by name: ``teacher`` (the main one, which gives the tokenizer) and ``teachers``."""
        return {"teacher": self.teacher, **self.teachers}
