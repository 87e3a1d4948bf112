"""A :class:`Run`: everything one training run is made of, built once from a config.

``distillkit distill``, ``distillkit cache-teacher``, ``distillkit study`` and ``distillkit bench --step`` all
build their runs here, the same way, in two stages:

1. :meth:`Run.prepare` (no weights): the task, the tokenizer, the tokenised data, the collator and the
   objective, sized from the model configs alone, so every mistake in a config (fields, data columns,
   loss parameters, layer maps, task/loss combinations) is reported before any weights load;
2. :meth:`Run.load`: the accelerator, the teachers (fine-tuned first where asked), the student, where
   each teacher's taps come from (its model, or its cache), and the strategy that spreads the models over
   the processes (``train.strategy``: :mod:`~distillkit.run.strategy`).

The training loop (:func:`distillkit.run.loop.fit`) then takes the run as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from distillkit.config import DistillConfig, TrainConfig
from distillkit.data import TaskData
from distillkit.errors import ConfigError
from distillkit.models import (
    load_config_of,
    load_model,
    load_tokenizer,
    quiet_loading,
    student_from_teacher,
)
from distillkit.objective.cross_tokenizer import check_across_tokenizers, share_vocabularies
from distillkit.objective.objective import DistillationObjective
from distillkit.objective.terms import ModelDims
from distillkit.run.engine import make_accelerator
from distillkit.run.output_dir import run_fingerprint as identity_fingerprint
from distillkit.run.strategy import Strategy, check_strategy, make_strategy
from distillkit.run.teachers import load_teacher, teacher_sources
from distillkit.run.tokenizers import both_tokenizers, student_tokenizer_of
from distillkit.run.vocabulary import check_vocabularies, model_configs
from distillkit.tasks import Task, make_task
from distillkit.teacher_cache import TeacherCache


@dataclass
class Run:
    """One training run: its config, task, data, objective, models and engine.

    Attributes:
        config: The validated config.
        task: The task (model head, data, evaluation, report).
        tokenizer: The teacher's tokenizer.
        data: The tokenised train/eval splits.
        collator: Turns a list of rows into a batch of tensors.
        objective: The loss terms, built for the models' sizes.
        train: The optimisation settings (``config.train`` unless the run is derived, e.g. a fine-tuning).
        output_dir: Where logs, checkpoints and the student go.
        accelerator: The engine (None before :meth:`load`).
        student: The model being trained (None before :meth:`load`).
        teacher: The main teacher model, which evaluation compares the student with (None when there is none).
        teachers: Teacher name -> where its taps come from: a frozen model run live, or a
            :class:`~distillkit.teacher_cache.TeacherCache`.
        teacher_info: What is known of the main teacher (``source``; ``eval`` of a fine-tuned one).
        fingerprint: Identifies the model/objective/data setup; a checkpoint of another setup is refused.
        description: The label of the progress bar.
        strategy: Replicated or sharded training over the processes (None before :meth:`load`).
        student_tokenizer: The student's tokenizer (saved with it). When it differs from the teacher's
            (:attr:`cross_tokenizer`), batches carry the student's tokens and the teacher's of the same text
            under ``teacher_`` keys; else it tokenises like ``tokenizer`` and the batches are the teacher's.

    """

    config: DistillConfig
    task: Task
    tokenizer: Any
    data: TaskData
    collator: Callable
    objective: DistillationObjective
    train: TrainConfig
    output_dir: Path
    accelerator: Accelerator | None = None
    student: nn.Module | None = None
    teacher: nn.Module | None = None
    teachers: dict[str, nn.Module | TeacherCache] = field(default_factory=dict)
    teacher_info: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    description: str = "distill"
    strategy: Strategy | None = None
    student_tokenizer: Any = None

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the student has another tokenizer than the teacher (each reads its own tokens)."""
        return self.student_tokenizer is not None and self.student_tokenizer is not self.tokenizer

    @classmethod
    def prepare(cls, config: DistillConfig) -> Run:
        """Builds everything but the models: task, tokenizer, data, collator and the objective (checked).

        Raises:
            ConfigError: For anything in the config that cannot work, naming the field and the fix.

        """
        task = make_task(config)
        tokenizer = load_tokenizer(config.teacher)
        student_tokenizer, differences = student_tokenizer_of(config, task, tokenizer)
        streams = (student_tokenizer, tokenizer) if differences else (tokenizer,)
        data = task.load_data(*streams)
        collator = task.collator(*streams)
        set_seed(config.train.seed)  # the objective's learned parts are initialised from the run's seed
        own = student_tokenizer if differences else None
        objective = build_objective(config, task, data, own)
        check_strategy(config, data.num_labels)
        check_vocabularies(config, tokenizer, data.num_labels, objective, own)
        if differences:
            both = both_tokenizers(config, tokenizer, student_tokenizer)
            check_across_tokenizers(objective, task.info, both, differences)
        share_vocabularies(objective, student_tokenizer.get_vocab(), tokenizer.get_vocab())
        return cls(
            student_tokenizer=student_tokenizer if differences else tokenizer,
            config=config,
            task=task,
            tokenizer=tokenizer,
            data=data,
            collator=collator,
            objective=objective,
            train=config.train,
            output_dir=Path(config.output_dir),
        )

    @classmethod
    def from_config(cls, config: DistillConfig, **load: Any) -> Run:
        """:meth:`prepare`, then :meth:`load` with ``load``'s keyword arguments."""
        return cls.prepare(config).load(**load)

    def load(
        self, accelerator: Accelerator | None = None, finetune_teacher: bool = True, announce: bool = True
    ) -> Run:
        """Loads the teachers (fine-tuning first where asked), the student and the teachers' sources.

        Args:
            accelerator: The engine (default: a new one).
            finetune_teacher: False loads a teacher that would be fine-tuned as it is given.
            announce: Print where the teacher and the student come from.

        Returns:
            This run, loaded.

        """
        config = self.config
        self.accelerator = accelerator or make_accelerator(config.train.report_to, self.output_dir)
        with quiet_loading():
            teacher, self.teacher_info = load_teacher(self, config.teacher, finetune_teacher)
            others = self._other_teachers(finetune_teacher)
            set_seed(config.train.seed)
            tokenizers = (self.student_tokenizer, self.tokenizer) if self.cross_tokenizer else ()
            self.student = build_student(config, teacher, self.data.num_labels, *tokenizers)
        if announce and self.accelerator.is_main_process:
            print(f"distillkit: teacher {self.teacher_info['source']}; student {student_origin(config)}")
        models = {"teacher": teacher, **others}
        self._check_sizes(models)
        self.teacher = teacher
        self.teachers = teacher_sources(self, models)
        if config.teacher.cache:
            self.teacher_info["cache"] = config.teacher.cache
        self.fingerprint = run_fingerprint(config)
        self.strategy = make_strategy(self.train, self.accelerator)
        return self

    def derived(self, **changes: Any) -> Run:
        """A copy of this run with some parts replaced (e.g. another student, objective or schedule)."""
        return dataclasses.replace(self, **changes)

    def _other_teachers(self, finetune: bool) -> dict[str, nn.Module]:
        """Loads each teacher of ``teachers:`` that some term reads."""
        requests = self.objective.teacher_requests()
        return {
            name: load_teacher(self, spec, finetune)[0]
            for name, spec in self.config.teachers.items()
            if name in requests and requests[name].needs_forward
        }

    def _check_sizes(self, models: dict[str, nn.Module]) -> None:
        """The loaded models have the sizes the objective was built for (from their configs)."""
        objective = self.objective
        for name, model in models.items():
            actual = ModelDims.from_models(self.student, model, train_examples=len(self.data.train))
            expected = next(
                (
                    t.dims
                    for label, t in objective.terms.items()
                    if objective.term_teachers[label].names[0] == name
                ),
                actual,
            )
            if actual != expected:
                raise AssertionError(f"model sizes {actual} differ from those the objective was built for")


def build_objective(
    config: DistillConfig, task: Task, data: TaskData, student_tokenizer: Any = None
) -> DistillationObjective:
    """Builds the objective from the model configs alone (no weights) and checks it against the task.

    Layer maps, projections and banks are sized from the student's config and the config of the teacher
    each term reads, so a bad layer index, an impossible task/loss pair or a missing label is reported
    before any weights load.

    Args:
        config: The run config.
        task: The task.
        data: The tokenised data.
        student_tokenizer: The student's own tokenizer when it differs from the teacher's (its vocabulary
            sizes a student built from the teacher, and must fit the student's embeddings), else None.

    Raises:
        ConfigError: Naming the term and the fix.

    """
    teacher_config, student_cfg = model_configs(config, data.num_labels, student_tokenizer)
    vocab = getattr(student_cfg, "vocab_size", None)
    if student_tokenizer is not None and vocab is not None and vocab < len(student_tokenizer):
        raise ConfigError(
            f"the student has {vocab:,} token embeddings, fewer than its tokenizer's "
            f"{len(student_tokenizer):,} tokens; give the student a vocab_size of at least that many "
            "(student.config) or a tokenizer that fits it"
        )
    dims = {}
    for name, teacher_spec in config.teacher_specs().items():
        if name == "teacher":
            other = teacher_config
        else:
            other = load_config_of(teacher_spec, f"teachers.{name}", config.task, data.num_labels)
            vocab = getattr(teacher_config, "vocab_size", None), getattr(other, "vocab_size", None)
            if None not in vocab and vocab[0] != vocab[1]:
                raise ConfigError(
                    f"teachers.{name} has a vocabulary of {vocab[1]} tokens, but the batches are tokenised "
                    f"for the main teacher's {vocab[0]}; all teachers must share the main teacher's tokenizer"
                )
        dims[name] = ModelDims.from_configs(student_cfg, other, train_examples=len(data.train))
    objective = DistillationObjective.from_config(config.objective, dims)
    objective.check_task(task.info)
    return objective


def build_student(config: DistillConfig, teacher: nn.Module, num_labels: int, *tokenizers: Any) -> nn.Module:
    """Builds the student from its path or config, or from the teacher (``layers``, ``hidden_size``).

    ``tokenizers``: the student's and the teacher's when they differ (a student built from the teacher then
    gets the student tokenizer's vocabulary, see :func:`~distillkit.models.student_from_teacher`).
    """
    spec = config.student
    if spec.path is not None or spec.config is not None:
        return load_model(spec, num_labels, "student", config.task)
    return student_from_teacher(teacher, spec, *tokenizers)


def student_origin(config: DistillConfig) -> str:
    """Where the student comes from, in words."""
    spec = config.student
    if spec.path is not None:
        return f"loaded from {spec.path}"
    if spec.config is not None:
        return "built from student.config (random initialisation)"
    if spec.hidden_size is not None:
        return f"{spec.layers or 'all'} layers of width {spec.hidden_size}, randomly initialised"
    return f"{spec.layers} layers initialised from evenly spaced teacher layers"


def run_fingerprint(config: DistillConfig) -> str:
    """Identifies what a checkpoint of this run holds: task, models, objective and data.

    Where a teacher's outputs come from (model or cache) and the schedule are left out (the fields:
    :func:`~distillkit.run.output_dir.run_identity`).
    """
    return identity_fingerprint(config)
