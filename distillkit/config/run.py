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
from distillkit.errors import close_matches, quote_input


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

    @model_validator(mode="after")
    def _generation_fits(self) -> DistillConfig:
        """``train.generation`` and prompt/completion data: a causal LM, room to sample, live teachers."""
        generation, data = self.train.generation, self.data
        if self.task != "causal_lm":
            for name, value in (("train.generation", generation), ("data.prompt_column", data.prompt_column)):
                if value is not None:
                    raise ValueError(
                        f"{name} is for task 'causal_lm' (sampled continuations, prompt/completion text); "
                        f"task '{self.task}' has none: remove {name} or set task: causal_lm"
                    )
        if generation is None:
            return self
        if generation.prompt_tokens >= data.max_length:
            raise ValueError(
                f"train.generation.prompt_tokens ({generation.prompt_tokens}) must be below data.max_length "
                f"({data.max_length}) to leave room for sampled tokens: lower prompt_tokens or raise "
                "max_length"
            )
        room = data.max_length - generation.prompt_tokens
        if generation.max_new_tokens is not None and generation.max_new_tokens > room:
            raise ValueError(
                f"train.generation.max_new_tokens ({generation.max_new_tokens}) plus prompt_tokens "
                f"({generation.prompt_tokens}) exceeds data.max_length ({data.max_length}): set "
                f"max_new_tokens to at most {room} (or leave it out), or raise data.max_length"
            )
        cached = [name for name, spec in self.teacher_specs().items() if spec.cache]
        if generation.samples and cached:
            field = "teacher.cache" if cached[0] == "teacher" else f"teachers.{cached[0]}.cache"
            raise ValueError(
                f"train.generation samples new sequences, which a cache of teacher outputs cannot score: "
                f"remove {field} (run the teacher live) or set train.generation.student_fraction and "
                "teacher_fraction to 0"
            )
        if generation.samples and self.train.strategy == "fsdp":
            raise ValueError(
                "train.generation samples with the whole student and teacher in each process, but "
                "train.strategy: fsdp shards them across the processes; use train.strategy: ddp for sampled "
                "sequences, or set train.generation.student_fraction and teacher_fraction to 0"
            )
        return self

    def _check_teachers(self) -> None:
        if "teacher" in self.teachers:
            raise ValueError("'teacher' names the main teacher (`teacher:`); give the others other names")
        for name, spec in self.teachers.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"teacher name {quote_input(name)} may only use letters, digits and _ . -")
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
                        f"objective.{index} ({term.loss}) reads teacher {quote_input(name)}{hint}, "
                        f"which is not defined; teachers: {', '.join(known)} (add it under `teachers:`)"
                    )

    def teacher_specs(self) -> dict[str, ModelConfig]:
        """Every teacher by name: ``teacher`` (the main one, which gives the tokenizer) and ``teachers``."""
        return {"teacher": self.teacher, **self.teachers}
