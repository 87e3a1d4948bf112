"""``distillkit distill``: task, data, objective check, teacher, student, loop, report.

:func:`distill` checks everything the user can get wrong (config fields, data columns, labels, loss
parameters, task/loss combinations, layer maps against the model configs) before any model weights load,
then hands over to :func:`distillkit.run.loop.fit`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from distillkit.config import DistillConfig, load_config
from distillkit.data import TaskData
from distillkit.errors import ConfigError
from distillkit.models import (
    count_parameters,
    freeze,
    load_config_of,
    load_model,
    load_tokenizer,
    quiet_loading,
    student_config,
    student_from_teacher,
)
from distillkit.objective.objective import DistillationObjective
from distillkit.objective.taps import NOTHING, TapRequest, Taps
from distillkit.objective.terms import LossTerm, ModelDims
from distillkit.ops.divergences import label_cross_entropy
from distillkit.run.loop import (
    FitResult,
    NonFiniteLossError,
    autocast_factory,
    eval_loader,
    fit,
    make_accelerator,
)
from distillkit.tasks import EvalContext, ReportContext, Task, make_task
from distillkit.teacher_cache import TeacherCache, expected_meta

__all__ = ["NonFiniteLossError", "distill", "fit", "make_accelerator", "run_distill"]


CACHE_FIELDS = {"cache", "cache_top_k"}
"""Teacher fields that say where its outputs are read from, not what they are (left out of fingerprints)."""


_TERM_TEACHER_FIELDS = {"teacher", "teacher_weights", "teacher_mix"}


def _fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]


class _LabelCrossEntropy(LossTerm):
    """The student's cross-entropy on the task's labels: the objective of a teacher's fine-tuning."""

    name = "label cross-entropy"
    student_reads = TapRequest(logits=True, labels=True)
    uses_teacher = False

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Mean cross-entropy of ``[B, C]`` logits against ``[B]`` labels."""
        return label_cross_entropy(student.logits, student.labels)


FINETUNE_RECORD = "finetune.json"
"""Written last into a fine-tuned teacher's directory: its presence means the fine-tuning finished."""


def finetuned_teacher_dir(config: DistillConfig, label_names: Sequence[str]) -> Path:
    """Where the teacher fine-tuned for ``config`` is cached (whether or not it is there yet).

    The key covers what the fine-tuning sees: the teacher spec, the data (not the size of the evaluation
    subset), the label names and the precision.

    Args:
        config: A run config with ``teacher.finetune`` set.
        label_names: The task's label names (:attr:`~distillkit.data.TaskData.label_names`).

    Returns:
        ``<teacher.finetune.cache_dir>/<teacher name>-<key>``; it holds ``finetune.json`` once done.

    """
    spec = config.teacher
    if spec.finetune is None:
        raise ValueError("finetuned_teacher_dir needs a config with teacher.finetune set")
    data_key = config.data.model_dump(exclude={"max_eval_examples"})
    key = _fingerprint(
        spec.model_dump(exclude=CACHE_FIELDS), data_key, list(label_names), config.train.precision
    )
    name = Path((spec.path or "config").rstrip("/")).name.replace(":", "_")
    return Path(spec.finetune.cache_dir) / f"{name}-{key}"


def prepare_teacher(
    config: DistillConfig, data: TaskData, collator: Any, tokenizer: Any, accelerator: Accelerator, task: Task
) -> tuple[nn.Module, dict[str, Any]]:
    """Loads the teacher, fine-tuning it on the task first (once; cached) when ``teacher.finetune`` is set.

    Args:
        config: The run config.
        data: The task data.
        collator: Pads batches.
        tokenizer: Saved with a fine-tuned teacher.
        accelerator: The engine.
        task: The run's task (its model class and evaluation).

    Returns:
        The frozen teacher, and ``{"cache": dir, "eval": metrics}`` for a fine-tuned one (else ``{}``).

    """
    spec = config.teacher
    tune = spec.finetune
    set_seed(config.data.split_seed)  # a teacher built from `config` is the same in every run and seed
    if tune is None:
        return freeze(load_model(spec, data.num_labels, "teacher", config.task)), {"source": "as given"}
    eval_key = _fingerprint(config.data.model_dump())
    cache = finetuned_teacher_dir(config, data.label_names)
    done = cache / FINETUNE_RECORD
    if done.exists():
        teacher = load_model(
            spec.model_copy(update={"path": str(cache)}), data.num_labels, "teacher", config.task
        )
        info = json.loads(done.read_text(encoding="utf-8"))
        info["source"] = f"fine-tuned, from the cache {cache}"
        scored = cache / f"eval-{eval_key}.json"  # the teacher's score on this evaluation subset, if known
        info["eval"] = json.loads(scored.read_text(encoding="utf-8")) if scored.exists() else {}
        info["eval_cache"] = str(scored)
        return freeze(teacher), info
    if accelerator.is_main_process:
        print(f"distillkit: fine-tuning the teacher for {tune.steps} steps, once (cached in {cache})")
    teacher = load_model(spec, data.num_labels, "teacher", config.task)
    dims = ModelDims.from_models(teacher, teacher)
    objective = DistillationObjective([(_LabelCrossEntropy(_LabelCrossEntropy.Params(), dims), 1.0)])
    train = config.train.model_copy(
        update={
            "steps": tune.steps,
            "batch_size": tune.batch_size,
            "lr": tune.lr,
            "warmup_ratio": tune.warmup_ratio,
            "grad_accum": 1,
            "eval_every": None,
            "save_every": None,
            "seed": config.data.split_seed,
        }
    )
    result = fit(
        accelerator=accelerator,
        student=teacher,
        teacher=None,
        objective=objective,
        data=data,
        collator=collator,
        train=train,
        output_dir=cache / "run",
        evaluator=task.evaluate,
        description="fine-tune teacher",
    )
    info = {
        "source": f"fine-tuned for {result.step} steps, cached in {cache}",
        "cache": str(cache),
        "eval": result.eval,
        "eval_key": eval_key,
        "seconds": result.seconds,
        "steps": result.step,
    }
    if accelerator.is_main_process:
        teacher.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
        done.write_text(json.dumps(info, indent=2), encoding="utf-8")
        (cache / f"eval-{eval_key}.json").write_text(json.dumps(result.eval), encoding="utf-8")
    accelerator.wait_for_everyone()
    return freeze(teacher), info


def build_student(config: DistillConfig, teacher: nn.Module, num_labels: int) -> nn.Module:
    """Builds the student from its path or config, or from the teacher (``layers``, ``hidden_size``)."""
    spec = config.student
    if spec.path is not None or spec.config is not None:
        return load_model(spec, num_labels, "student", config.task)
    return student_from_teacher(teacher, spec)


def build_objective(config: DistillConfig, task: Task, data: TaskData) -> DistillationObjective:
    """Builds the objective from the model configs alone (no weights) and checks it against the task.

    Layer maps, projections and banks are sized from the student's config and the config of the teacher
    each term reads, so a bad layer index, an impossible task/loss pair or a missing label is reported
    before any weights load.

    Raises:
        ConfigError: Naming the term and the fix.

    """
    teacher_config = load_config_of(config.teacher, "teacher", config.task, data.num_labels)
    spec = config.student
    if spec.path is not None or spec.config is not None:
        student_cfg = load_config_of(spec, "student", config.task, data.num_labels)
    else:
        student_cfg = student_config(teacher_config, spec)[0]
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


def load_other_teachers(
    config: DistillConfig,
    objective: DistillationObjective,
    data: TaskData,
    collator: Any,
    tokenizer: Any,
    accelerator: Accelerator,
    task: Task,
) -> dict[str, nn.Module]:
    """Loads (fine-tuning first where asked) each teacher of ``teachers:`` that some term reads."""
    requests = objective.teacher_requests()
    loaded = {}
    for name, spec in config.teachers.items():
        if name in requests and requests[name].needs_forward:
            other = config.model_copy(update={"teacher": spec})
            loaded[name] = prepare_teacher(other, data, collator, tokenizer, accelerator, task)[0]
    return loaded


def teacher_sources(
    config: DistillConfig,
    objective: DistillationObjective,
    models: dict[str, nn.Module],
    tokenizer: Any,
    accelerator: Accelerator,
) -> dict[str, nn.Module | TeacherCache]:
    """Where each teacher's taps come from: its cache (``cache:``, checked against this run) or the model.

    Raises:
        ConfigError: If a cache was written for another teacher, data, tokenizer or precision, or lacks
            something a term reads; the message lists the differences.

    """
    requests = objective.teacher_requests()
    sources: dict[str, nn.Module | TeacherCache] = {}
    for name, model in models.items():
        spec = config.teacher_specs()[name]
        if spec.cache is None:
            sources[name] = model
            continue
        cache = TeacherCache(spec.cache)
        meta = expected_meta(config, model, tokenizer, accelerator.device)
        who = "teacher" if name == "teacher" else f"teacher '{name}'"
        cache.check(
            meta, requests.get(name, NOTHING), objective.teacher_layers(name), top_k=spec.cache_top_k, who=who
        )
        if accelerator.is_main_process:
            print(f"distillkit: {who}: outputs read from the cache {spec.cache} ({len(cache)} examples)")
        sources[name] = cache
    return sources


def distill(
    config: DistillConfig, resume: bool = False, stop_after_step: int | None = None
) -> dict[str, Any]:
    """Runs a whole distillation: data, objective, teacher (fine-tuned if asked), student, loop, report.

    Args:
        config: The validated config.
        resume: Continue from the newest checkpoint in ``output_dir``.
        stop_after_step: Stop after this step as if interrupted (the checkpoint is written).

    Returns:
        The summary also written to ``<output_dir>/summary.json``.

    """
    started = time.perf_counter()
    accelerator = make_accelerator()
    output_dir = Path(config.output_dir)
    task = make_task(config)
    tokenizer = load_tokenizer(config.teacher)
    data = task.load_data(tokenizer)
    collator = task.collator(tokenizer)
    set_seed(config.train.seed)
    objective = build_objective(config, task, data)  # every config mistake surfaces here, before weights
    with quiet_loading():
        teacher, teacher_info = prepare_teacher(config, data, collator, tokenizer, accelerator, task)
        others = load_other_teachers(config, objective, data, collator, tokenizer, accelerator, task)
        set_seed(config.train.seed)
        student = build_student(config, teacher, data.num_labels)
    if accelerator.is_main_process:
        print(f"distillkit: teacher {teacher_info['source']}; student {_student_origin(config)}")
    models = {"teacher": teacher, **others}
    for name, model in models.items():
        actual = ModelDims.from_models(student, model, train_examples=len(data.train))
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
    sources = teacher_sources(config, objective, models, tokenizer, accelerator)
    if config.teacher.cache:
        teacher_info["cache"] = config.teacher.cache
    fingerprint = _fingerprint(
        config.task,
        config.student.model_dump(),
        config.teacher.model_dump(exclude=CACHE_FIELDS),
        [t.model_dump(exclude=_TERM_TEACHER_FIELDS - t.model_fields_set) for t in config.objective],
        config.data.model_dump(),
        *(
            [{n: s.model_dump(exclude=CACHE_FIELDS) for n, s in config.teachers.items()}]
            if config.teachers
            else []
        ),
    )
    result = fit(
        accelerator=accelerator,
        student=student,
        teacher=teacher,
        objective=objective,
        data=data,
        collator=collator,
        train=config.train,
        output_dir=output_dir,
        evaluator=task.evaluate,
        resume=resume,
        fingerprint=fingerprint,
        stop_after_step=stop_after_step,
        teachers=sources,
    )
    if result.step < config.train.steps:
        return {"step": result.step, "stopped_early": True}
    summary = _finish(
        config, task, accelerator, student, teacher, teacher_info, data, collator, tokenizer, result
    )
    summary["wall_seconds"] = time.perf_counter() - started
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print("\n".join(["", *task.summary_lines(summary), *_common_lines(summary)]))
    return summary


def _student_origin(config: DistillConfig) -> str:
    spec = config.student
    if spec.path is not None:
        return f"loaded from {spec.path}"
    if spec.config is not None:
        return "built from student.config (random initialisation)"
    if spec.hidden_size is not None:
        return f"{spec.layers or 'all'} layers of width {spec.hidden_size}, randomly initialised"
    return f"{spec.layers} layers initialised from evenly spaced teacher layers"


def _finish(
    config: DistillConfig,
    task: Task,
    accelerator: Accelerator,
    student: nn.Module,
    teacher: nn.Module,
    teacher_info: dict[str, Any],
    data: TaskData,
    collator: Any,
    tokenizer: Any,
    result: FitResult,
) -> dict[str, Any]:
    output_dir = Path(config.output_dir)
    autocast = autocast_factory(config.train.precision, accelerator.device)
    teacher_eval = teacher_info.get("eval")  # a fine-tuned teacher was scored on this eval split
    if not teacher_eval:
        loader = eval_loader(accelerator, data, collator, config.train)
        teacher_eval = task.evaluate(teacher, loader, EvalContext(accelerator=accelerator, autocast=autocast))
        if teacher_info.get("eval_cache") and accelerator.is_main_process:
            Path(teacher_info["eval_cache"]).write_text(json.dumps(teacher_eval), encoding="utf-8")
    summary: dict[str, Any] = {
        "task": config.task,
        "steps": result.step,
        "skipped_steps": result.skipped,
        "train_seconds": result.seconds,
        "final_terms": result.final_terms,
        "student": {"eval": result.eval, "parameters": count_parameters(student)},
        "teacher": {**teacher_info, "eval": teacher_eval, "parameters": count_parameters(teacher)},
        "labels": data.label_names,
        "eval_examples": len(data.eval),
        "train_examples": len(data.train),
    }
    if accelerator.is_main_process:
        summary.update(
            task.report(
                ReportContext(
                    student=student,
                    teacher=teacher,
                    data=data,
                    collator=collator,
                    tokenizer=tokenizer,
                    accelerator=accelerator,
                    autocast=autocast,
                )
            )
        )
        final = output_dir / "student"
        if data.label_names:
            student.config.id2label = dict(enumerate(data.label_names))
            student.config.label2id = {name: i for i, name in enumerate(data.label_names)}
        with quiet_loading():
            student.save_pretrained(final)
            tokenizer.save_pretrained(final)
        summary["student"]["path"] = str(final)
    accelerator.wait_for_everyone()
    return summary


def _common_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["final losses: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["final_terms"].items())]
    lines.append(f"student saved to {summary['student'].get('path')}")
    return lines


def run_distill(
    config_path: str | Path, overrides: Sequence[str] = (), resume: bool = False
) -> dict[str, Any]:
    """``distillkit distill CONFIG.yaml [--set key=value ...] [--resume]``.

    Args:
        config_path: The YAML config.
        overrides: ``key.path=value`` strings.
        resume: Continue from the newest checkpoint.

    Returns:
        The run summary.

    """
    return distill(load_config(config_path, overrides), resume=resume)
