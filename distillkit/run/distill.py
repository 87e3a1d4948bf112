"""``distillkit distill``: build the run, train it, report and save the student.

:func:`distill` builds a :class:`~distillkit.run.run.Run` (every config mistake is reported before any
weights load), trains it with :func:`~distillkit.run.loop.fit`, then scores the teacher, lets the task add its
report (speed, samples, probes), saves the student with its own tokenizer and model card (``README.md``, see
:mod:`~distillkit.run.model_card`) and writes ``summary.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distillkit.config import DistillConfig, load_config
from distillkit.models import count_parameters, quiet_loading
from distillkit.objective.taps import teacher_view
from distillkit.run.callbacks import Callback
from distillkit.run.engine import autocast_factory
from distillkit.run.loaders import eval_loader
from distillkit.run.loop import FitResult, fit
from distillkit.run.model_card import run_card, write_model_card
from distillkit.run.numbers import format_loss
from distillkit.run.output_dir import RunRecord, check_output_dir, replace_previous_run
from distillkit.run.predictions import evaluate_examples, write_predictions
from distillkit.run.run import Run
from distillkit.tasks import EvalContext, ReportContext
from distillkit.tasks.examples import PER_EXAMPLE


def distill(
    config: DistillConfig,
    resume: bool = False,
    stop_after_step: int | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Runs a whole distillation: data, objective, teacher (fine-tuned if asked), student, loop, report.

    Args:
        config: The validated config.
        resume: Continue the run in ``output_dir`` from its newest checkpoint.
        stop_after_step: Stop after this step as if interrupted (the checkpoint is written).
        overwrite: Replace the run in ``output_dir`` (its outputs are removed once this run has loaded).
        callbacks: Told of the loop's events, after the one that records the run (``run.json``).

    Returns:
        The summary also written to ``<output_dir>/summary.json``.

    Raises:
        ConfigError: For a config mistake, before any weights load; for an ``output_dir`` that already holds
            something (without ``resume`` or ``overwrite``), or a run of other settings or past
            ``train.steps`` (with ``resume``), before anything is read or written
            (see :mod:`distillkit.run.output_dir`).

    """
    started = time.perf_counter()
    check_output_dir(config, resume=resume, overwrite=overwrite)
    run = Run.from_config(config)
    if overwrite:
        replace_previous_run(run.output_dir, run.accelerator)
    record = RunRecord(config)
    result = fit(run, resume=resume, stop_after_step=stop_after_step, callbacks=[record, *callbacks])
    if result.step < config.train.steps:
        return {"step": result.step, "stopped_early": True}
    summary = finish(run, result)
    summary["wall_seconds"] = time.perf_counter() - started
    if run.accelerator.is_main_process:
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print("\n".join(["", *run.task.summary_lines(summary), *_common_lines(summary)]))
    return summary


def finish(run: Run, result: FitResult) -> dict[str, Any]:
    """Scores the teacher, adds the task's report, saves the student; returns the run's summary."""
    config, accelerator, task, data = run.config, run.accelerator, run.task, run.data
    autocast = autocast_factory(run.train.precision, accelerator.device)
    teacher_info, teacher, student = run.teacher_info, run.teacher, run.student
    teacher_eval = teacher_info.get("eval")  # a fine-tuned teacher was scored on this eval split
    if not teacher_eval:
        context = EvalContext(accelerator=accelerator, autocast=autocast)
        teacher_eval = task.evaluate(teacher, map(teacher_view, eval_loader(run)), context)
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
    strategy = run.strategy
    examples = None
    if config.evaluation.predictions:
        with strategy.gathered():
            examples = evaluate_examples(run, autocast)
    if accelerator.is_main_process or strategy.sharded:  # sharded models run on every process together
        report = ReportContext(
            student=student,
            teacher=teacher,
            data=data,
            collator=run.collator,
            tokenizer=run.tokenizer,
            accelerator=accelerator,
            autocast=autocast,
            student_tokenizer=run.student_tokenizer,
        )
        with strategy.gathered():
            reported = task.report(report)
        if accelerator.is_main_process:
            summary.update(reported)
    weights = strategy.full_state_dict(student)  # the whole student, gathered when it is sharded
    if accelerator.is_main_process:
        examples = {**(examples or {}), **summary.pop(PER_EXAMPLE, {})}
        if config.evaluation.predictions:
            summary["predictions"] = str(write_predictions(run.output_dir, config, examples))
        final = run.output_dir / "student"
        if data.label_names:
            student.config.id2label = dict(enumerate(data.label_names))
            student.config.label2id = {name: i for i, name in enumerate(data.label_names)}
        with quiet_loading():
            student.save_pretrained(final, state_dict=weights)
            (run.student_tokenizer or run.tokenizer).save_pretrained(final)  # the student's own
        write_model_card(final, run_card(run, summary))
        summary["student"]["path"] = str(final)
    accelerator.wait_for_everyone()
    return summary


def _common_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["final losses: " + ", ".join(f"{k} {format_loss(v)}" for k, v in summary["final_terms"].items())]
    lines.append(f"student saved to {summary['student'].get('path')}")
    return lines


def run_distill(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """``distillkit distill CONFIG.yaml [--set key=value ...] [--resume | --overwrite]``.

    Args:
        config_path: The YAML config.
        overrides: ``key.path=value`` strings.
        resume: Continue the run in ``output_dir`` from its newest checkpoint.
        overwrite: Replace the run in ``output_dir``.
        callbacks: Told of the loop's events.

    Returns:
        The run summary.

    """
    config = load_config(config_path, overrides)
    return distill(config, resume=resume, overwrite=overwrite, callbacks=callbacks)
