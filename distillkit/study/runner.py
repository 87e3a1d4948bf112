"""Runs a study: the shared teacher cache, stale-run invalidation, runs in order or in parallel processes.

One run's execution and the process pool are :mod:`distillkit.study.execution`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distillkit.config import DistillConfig
from distillkit.errors import ConfigError
from distillkit.study.compare import add_comparisons, load_predictions, variant_rows
from distillkit.study.execution import RUN_RECORD, execute, run_parallel
from distillkit.study.report import RESULT_FILES, ReportInfo, write_report
from distillkit.study.spec import StudyConfig, fingerprint, identity_changes, load_study, run_identity


def _cache_identity(config: DistillConfig) -> dict[str, Any]:
    identity = {
        "task": config.task,
        "teacher": config.teacher.model_dump(mode="json", exclude={"cache"}),
        "data": config.data.training_identity(),
        "precision": config.train.precision,
    }
    student_tokenizer = config.student.tokenizer or config.student.path
    if student_tokenizer is not None:  # the blocks of a cache written across tokenizers depend on it
        identity["student_tokenizer"] = student_tokenizer
    return identity


def fill_teacher_cache(
    study: StudyConfig, runs: dict[str, DistillConfig], fold: int | None = None
) -> str | None:
    """Caches the main teacher once for every run: what the union of the variants' objectives reads.

    A cache written for another teacher, data or precision (the base config changed) is written again. With
    cross-evaluation every fold has its own training data, teacher and cache (``teacher-cache-fold-<k>``).

    Returns:
        The cache directory, or None when the runs cannot share a cache (a ``masked_lm`` task, a base config
        with its own ``teacher.cache`` or several teachers, a run that samples sequences (so that every run
        reads the teacher the same way and their times compare), or no variant reading the teacher).

    """
    from distillkit.objective.taps import NOTHING
    from distillkit.run.cache_teacher import cache_teacher
    from distillkit.run.run import Run, build_objective
    from distillkit.teacher_cache import TeacherCache

    first = next(iter(runs.values()))
    if first.task == "masked_lm" or first.teacher.cache or first.teachers:
        return None
    if any(c.train.generation is not None and c.train.generation.samples for c in runs.values()):
        print("[study] the teacher runs live in every run: some runs sample sequences, which no cache holds")
        return None
    prepared = Run.prepare(first)
    task, data = prepared.task, prepared.data
    request, layers = NOTHING, ()
    for config in runs.values():
        objective = build_objective(config, task, data)
        request = request | objective.teacher_requests().get("teacher", NOTHING)
        mapped = objective.teacher_layers("teacher")
        layers = None if mapped is None or layers is None else tuple(sorted({*layers, *mapped}))
    if not request.needs_forward:
        return None
    directory = Path(study.output_dir) / ("teacher-cache" if fold is None else f"teacher-cache-fold-{fold}")
    key = fingerprint(_cache_identity(first))
    record = directory / "study-key.json"
    if (directory / "index.json").is_file():
        same_run = record.is_file() and json.loads(record.read_text(encoding="utf-8")).get("key") == key
        stored = TeacherCache(directory).contents
        holds = (
            (not request.hidden_states or (layers is not None and set(layers) <= set(stored.layers)))
            and (not request.attentions or stored.attentions)
            and (not request.logits or stored.logits is not None)
            and set(request.modules) <= set(stored.modules)
        )
        if same_run and holds:
            print(f"[study] teacher outputs cached earlier in {directory}")
            return str(directory)
        why = "it lacks what a variant reads" if same_run else "the teacher, data or precision changed"
        print(f"[study] the teacher cache in {directory} is written again: {why}")
        shutil.rmtree(directory)
    print(f"[study] caching the teacher's outputs once in {directory}")
    stats = cache_teacher(first, directory=directory, request=request, layers=layers)
    record.write_text(json.dumps({"key": key}), encoding="utf-8")
    print(f"[study] teacher cache: {stats['bytes_per_example'] / 1e3:.1f} kB per example")
    return str(directory)


def retire_stale_runs(runs: dict[str, DistillConfig], threads: int) -> None:
    """Moves aside every run whose recorded identity differs from its config now (to ``<run>.stale``).

    Only the runs whose config (or thread count) changed are redone; a run directory with results but without
    a record is treated as stale, since nothing says what it ran.
    """
    for run_id, config in runs.items():
        out = Path(config.output_dir)
        if not (
            (out / "summary.json").exists() or (out / "checkpoints").exists() or (out / RUN_RECORD).exists()
        ):
            continue  # nothing there to keep
        changes = recorded_changes(out, config, threads)
        if changes == []:
            continue
        why = "no record of what it ran" if changes is None else "changed " + ", ".join(changes[:6])
        stale = out.with_name(out.name + ".stale")
        if stale.exists():
            shutil.rmtree(stale)
        out.rename(stale)
        print(f"[study] {run_id}: {why}; runs again (the old run is kept in {stale})")


def recorded_changes(out: Path, config: DistillConfig, threads: int) -> list[str] | None:
    """What differs between the run recorded in ``out`` and ``config`` now: ``[]`` nothing, None no record."""
    record = out / RUN_RECORD
    if not record.is_file():
        return None
    recorded = json.loads(record.read_text(encoding="utf-8")).get("identity") or {}
    return identity_changes(recorded, run_identity(config, threads))


def _default_jobs(threads: int) -> int:
    """One run at a time on a GPU (runs would share it); else as many as the CPU cores hold."""
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, (os.cpu_count() or 1) // threads)


def run_study(
    study_path: str | Path,
    overrides: Sequence[str] = (),
    teacher_cache: bool = True,
    jobs: int | None = None,
    *,
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    output_dir: str | None = None,
    report_only: bool = False,
) -> list[dict[str, Any]]:
    """Runs every variant x seed (skipping finished runs), then writes and prints the comparison.

    Args:
        study_path: The study YAML file.
        overrides: Extra base-config overrides.
        teacher_cache: Run the teacher once into ``<output_dir>/teacher-cache`` and let every run read it.
        jobs: Runs at once, each in its own process (default: CPU cores / ``threads_per_run``; 1 with a
            GPU). Every run uses ``threads_per_run`` threads whatever this is, so the results do not
            depend on it.
        variants: Run only these variants.
        seeds: Run only these seeds.
        output_dir: Instead of the study's ``output_dir``.
        report_only: Run nothing: compare the runs finished so far (``--report``), e.g. while a long study
            runs elsewhere.

    Returns:
        One row per variant (see :func:`~distillkit.study.report.summarise`).

    Raises:
        ConfigError: With ``report_only``, when no run has finished yet.

    """
    study, runs = load_study(study_path, overrides, variants=variants, seeds=seeds, output_dir=output_dir)
    threads = study.threads_per_run
    if report_only:
        return _report(study, runs, finished_runs(runs, threads), None)
    jobs = jobs or _default_jobs(threads)
    retire_stale_runs(runs, threads)
    pending = {k: c for k, c in runs.items() if not (Path(c.output_dir) / "summary.json").exists()}
    for run_id in runs.keys() - pending.keys():
        print(f"[study] {run_id}: finished earlier, skipped")
    started = time.perf_counter()
    if pending:
        print(f"[study] {len(pending)} of {len(runs)} runs to do, {min(jobs, len(pending))} at a time")
    done = 0
    for fold, group in fold_groups(pending).items():
        cache = fill_teacher_cache(study, group, fold) if teacher_cache and study.teacher_cache else None
        if cache is not None:
            group = {
                k: c.model_copy(update={"teacher": c.teacher.model_copy(update={"cache": cache})})
                for k, c in group.items()
            }
        _run_group(group, threads, jobs, done, len(pending))
        done += len(group)
        if fold is not None and cache is not None:  # one fold's teacher outputs on disk at a time
            shutil.rmtree(cache)
            print(f"[study] fold {fold} done; its teacher cache {cache} is removed")
    elapsed = time.perf_counter() - started
    summary = f"{len(pending)} runs in {elapsed / 60:.1f} min with {jobs} at a time" if pending else None
    return _report(study, runs, finished_runs(runs, threads), summary)


def fold_groups(pending: dict[str, DistillConfig]) -> dict[int | None, dict[str, DistillConfig]]:
    """The pending runs by the fold they are scored on (one group, ``None``, without cross-evaluation)."""
    groups: dict[int | None, dict[str, DistillConfig]] = {}
    for run_id, config in pending.items():
        groups.setdefault(config.data.fold if config.data.folds else None, {})[run_id] = config
    return groups


def _run_group(group: dict[str, DistillConfig], threads: int, jobs: int, done: int, total: int) -> None:
    """Runs ``group`` in order (one job) or in ``jobs`` processes; ``done`` of ``total`` came before."""
    if jobs == 1 or len(group) == 1:
        for index, (run_id, config) in enumerate(group.items(), start=done + 1):
            doing = "resuming" if _resumes(config) else "running"
            print(f"[study {index}/{total}] {run_id}: {doing}")
            execute(config, threads, None)
    else:
        run_parallel(group, threads, jobs, _first_to_tune_teacher(group), done, total)


def finished_runs(runs: dict[str, DistillConfig], threads: int) -> dict[str, dict[str, Any]]:
    """``{run_id: summary}`` of the runs that finished with the config (and threads) they have now."""
    found = {}
    for run_id, config in runs.items():
        out = Path(config.output_dir)
        if not (out / "summary.json").is_file():
            continue
        changes = recorded_changes(out, config, threads)
        if changes is None:
            continue
        if changes:
            print(f"[study] {run_id}: ran with another config ({', '.join(changes[:3])}); left out")
            continue
        found[run_id] = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return found


def _report(
    study: StudyConfig,
    runs: dict[str, DistillConfig],
    summaries: dict[str, dict[str, Any]],
    done: str | None,
) -> list[dict[str, Any]]:
    """Writes and prints the comparison of the finished runs."""
    from distillkit.tasks import TASKS

    if not summaries:
        raise ConfigError(
            f"no run of the study in {study.output_dir} has finished yet; run it without --report"
        )
    task = TASKS[next(iter(runs.values())).task]
    metrics = study.metric_names(task.metric)
    rows = variant_rows(study, summaries, task, metrics)
    examples = load_predictions({run_id: runs[run_id].output_dir for run_id in summaries})
    add_comparisons(rows, study.baseline_of, metrics, task.example_metrics, examples, study.replicates)
    first = next(iter(summaries.values()))
    info = ReportInfo(
        task=task.name,
        baseline=study.baseline,
        baselines=dict(study.baselines),
        metrics=metrics,
        teacher=task.run_metrics(first, "teacher"),
        notes=design_notes(summaries),
        replicates=study.replicates,
        missing=len(runs) - len(summaries),
    )
    lines = write_report(Path(study.output_dir) / "results", info, rows, examples)
    print("\n".join(["", *lines, ""]))
    if done:
        print(f"[study] {done}")
    out = Path(study.output_dir)
    print("[study] results: " + ", ".join(str(out / name) for name in RESULT_FILES))
    return rows


def design_notes(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """One line on the runs' models, examples and steps, from their summaries."""

    def span(key: str) -> str:
        values = sorted({s[key] for s in summaries.values()})
        return f"{values[0]:,}" if len(values) == 1 else f"{values[0]:,}–{values[-1]:,}"

    first = next(iter(summaries.values()))
    teacher, student = first["teacher"]["parameters"], first["student"]["parameters"]
    return [
        f"Parameters: teacher {teacher:,}, student {student:,}. Held-out examples per run: "
        f"{span('eval_examples')}; training examples: {span('train_examples')}; steps: {span('steps')}."
    ]


def _resumes(config: DistillConfig) -> bool:
    return (Path(config.output_dir) / "checkpoints").is_dir()


def _first_to_tune_teacher(pending: dict[str, DistillConfig]) -> str | None:
    """The first pending run whose fine-tuned teacher is not cached yet (None when every one is).

    Runs that read the study's teacher cache load no teacher, so only live runs can need one.
    """
    from distillkit.data import load_label_names
    from distillkit.run.teachers import FINETUNE_RECORD, finetuned_teacher_dir

    label_names: dict[str, list[str]] = {}  # by data config: the runs of a study mostly share one
    for run_id, config in pending.items():
        if config.teacher.finetune is None or config.teacher.cache:
            continue
        data_key = config.data.model_dump_json()
        if data_key not in label_names:
            label_names[data_key] = load_label_names(config.data)
        if not (finetuned_teacher_dir(config, label_names[data_key]) / FINETUNE_RECORD).is_file():
            return run_id
    return None
