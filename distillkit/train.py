"""``distillkit distill``: data, teacher (fine-tuned once and cached if asked), student, loop, report.

:func:`distill` checks everything the user can get wrong (config fields, data columns, labels, loss
parameters) before the first training step, then hands over to :func:`distillkit.loop.fit`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from distillkit.config import DistillConfig, load_config
from distillkit.data import Collator, TaskData, load_task_data
from distillkit.errors import ConfigError
from distillkit.evaluate import evaluate, time_inference
from distillkit.loop import FitResult, NonFiniteLossError, fit, make_accelerator
from distillkit.losses import ModelDims
from distillkit.membank import IndexBank
from distillkit.models import count_parameters, freeze, load_model, load_tokenizer, student_from_teacher
from distillkit.objective import DistillationObjective

__all__ = ["NonFiniteLossError", "distill", "fit", "make_accelerator", "run_distill"]


def _fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]


def prepare_teacher(
    config: DistillConfig, data: TaskData, collator: Collator, tokenizer: Any, accelerator: Accelerator
) -> tuple[nn.Module, dict[str, Any]]:
    """Loads the teacher, fine-tuning it on the task first (once; cached) when ``teacher.finetune`` is set.

    Args:
        config: The run config.
        data: The task data.
        collator: Pads batches.
        tokenizer: Saved with a fine-tuned teacher.
        accelerator: The engine.

    Returns:
        The frozen teacher, and ``{"cache": dir, "eval": metrics}`` for a fine-tuned one (else ``{}``).

    """
    spec = config.teacher
    tune = spec.finetune
    set_seed(config.data.split_seed)  # a teacher built from `config` is the same in every run and seed
    if tune is None:
        return freeze(load_model(spec, data.num_labels, "teacher")), {}
    # The cache key covers what the fine-tuning sees (not the size of the evaluation subset).
    data_key = config.data.model_dump(exclude={"max_eval_examples"})
    key = _fingerprint(spec.model_dump(), data_key, data.label_names, config.train.precision)
    eval_key = _fingerprint(config.data.model_dump())
    name = Path((spec.path or "config").rstrip("/")).name.replace(":", "_")
    cache = Path(tune.cache_dir) / f"{name}-{key}"
    done = cache / "finetune.json"
    if done.exists():
        teacher = load_model(spec.model_copy(update={"path": str(cache)}), data.num_labels, "teacher")
        info = json.loads(done.read_text(encoding="utf-8"))
        scored = cache / f"eval-{eval_key}.json"  # the teacher's score on this evaluation subset, if known
        info["eval"] = json.loads(scored.read_text(encoding="utf-8")) if scored.exists() else {}
        info["eval_cache"] = str(scored)
        return freeze(teacher), info
    teacher = load_model(spec, data.num_labels, "teacher")
    dims = ModelDims.from_models(teacher, teacher)
    objective = DistillationObjective.from_config([{"loss": "ce"}], dims)
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
        description="fine-tune teacher",
    )
    info = {
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


def _check_index_banks(objective: nn.Module, examples: int) -> None:
    """Index-keyed memory banks need one slot per training example (``example_ids`` are 0..N-1)."""
    for name, module in objective.named_modules():
        if isinstance(module, IndexBank) and module.size < examples:
            term = name.split(".")[1] if name.startswith("terms.") else name
            raise ConfigError(
                f"objective term '{term}' has an index bank of {module.size} slots but the training data has "
                f"{examples} examples; set its bank.size to {examples}"
            )


def build_student(config: DistillConfig, teacher: nn.Module, num_labels: int) -> nn.Module:
    """Builds the student from its path or config, or from the teacher (``layers``, ``hidden_size``)."""
    spec = config.student
    if spec.path is not None or spec.config is not None:
        return load_model(spec, num_labels, "student")
    return student_from_teacher(teacher, spec)


def distill(
    config: DistillConfig, resume: bool = False, stop_after_step: int | None = None
) -> dict[str, Any]:
    """Runs a whole distillation: data, teacher (fine-tuned if asked), student, loop, evaluation, saving.

    Everything the user can get wrong (config fields, data columns, labels, loss parameters) is checked before
    the first training step.

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
    tokenizer = load_tokenizer(config.teacher)
    data = load_task_data(config.data, tokenizer)
    collator = Collator(tokenizer)
    # Validate the objective against the real model sizes before any training (also the teacher's).
    base = load_model(config.teacher.model_copy(update={"finetune": None}), data.num_labels, "teacher")
    probe = build_student(config, base, data.num_labels)
    _check_index_banks(
        DistillationObjective.from_config(config.objective, ModelDims.from_models(probe, base)),
        len(data.train),
    )
    del base, probe

    teacher, teacher_info = prepare_teacher(config, data, collator, tokenizer, accelerator)
    set_seed(config.train.seed)
    student = build_student(config, teacher, data.num_labels)
    objective = DistillationObjective.from_config(config.objective, ModelDims.from_models(student, teacher))
    fingerprint = _fingerprint(
        config.student.model_dump(),
        config.teacher.model_dump(),
        [t.model_dump() for t in config.objective],
        config.data.model_dump(),
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
        resume=resume,
        fingerprint=fingerprint,
        stop_after_step=stop_after_step,
    )
    if result.step < config.train.steps:
        return {"step": result.step, "stopped_early": True}
    summary = _finish(config, accelerator, student, teacher, teacher_info, data, collator, tokenizer, result)
    summary["wall_seconds"] = time.perf_counter() - started
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        _print_summary(summary)
    return summary


def _finish(
    config: DistillConfig,
    accelerator: Accelerator,
    student: nn.Module,
    teacher: nn.Module,
    teacher_info: dict[str, Any],
    data: TaskData,
    collator: Collator,
    tokenizer: Any,
    result: FitResult,
) -> dict[str, Any]:
    output_dir = Path(config.output_dir)
    eval_loader = accelerator.prepare_data_loader(
        DataLoader(
            data.eval, batch_size=config.train.eval_batch_size or config.train.batch_size, collate_fn=collator
        )
    )
    teacher_eval = teacher_info.get("eval")  # a fine-tuned teacher was scored on this eval split
    if not teacher_eval:
        teacher_eval = evaluate(teacher, eval_loader, data.num_labels, accelerator)
        if teacher_info.get("eval_cache") and accelerator.is_main_process:
            Path(teacher_info["eval_cache"]).write_text(json.dumps(teacher_eval), encoding="utf-8")
    summary: dict[str, Any] = {
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
        timing = [
            {
                k: v.to(accelerator.device)
                for k, v in collator([data.eval[i] for i in range(s, min(s + 32, len(data.eval)))]).items()
            }
            for s in range(0, min(len(data.eval), 128), 32)
        ]
        teacher_s = time_inference(teacher, timing, repeats=2)
        student_s = time_inference(student, timing, repeats=2)
        summary["inference"] = {
            "examples": sum(len(b["labels"]) for b in timing),
            "teacher_seconds": teacher_s,
            "student_seconds": student_s,
            "speedup": teacher_s / student_s if student_s > 0 else math.nan,
        }
        final = output_dir / "student"
        student.config.id2label = dict(enumerate(data.label_names))
        student.config.label2id = {name: i for i, name in enumerate(data.label_names)}
        student.save_pretrained(final)
        tokenizer.save_pretrained(final)
        summary["student"]["path"] = str(final)
    accelerator.wait_for_everyone()
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    teacher, student = summary["teacher"], summary["student"]
    lines = [
        "",
        f"{'':10} {'accuracy':>9} {'macro-F1':>9} {'params':>12}",
        *(
            f"{name:10} {part['eval']['accuracy']:9.4f} {part['eval']['f1']:9.4f} {part['parameters']:12,}"
            for name, part in (("teacher", teacher), ("student", student))
        ),
        f"held-out examples: {summary['eval_examples']}  (trained on {summary['train_examples']})",
    ]
    if "inference" in summary:
        inf = summary["inference"]
        lines.append(
            f"inference on {inf['examples']} examples: teacher {inf['teacher_seconds']:.3f}s, student "
            f"{inf['student_seconds']:.3f}s, speed-up x{inf['speedup']:.2f}"
        )
    lines.append("final losses: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["final_terms"].items()))
    lines.append(f"student saved to {student.get('path')}")
    print("\n".join(lines))


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
