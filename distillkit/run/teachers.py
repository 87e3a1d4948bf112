"""A run's teachers: loaded as given, fine-tuned on the task first (once, cached), or read from a cache.

- :func:`load_teacher`: one teacher of a config as a frozen model; with ``teacher.finetune`` it is trained on
  the task's labels first (by the same loop as a distillation, with a cross-entropy objective) and kept in
  ``teacher.finetune.cache_dir`` for every later run.
- :func:`teacher_sources`: where each teacher's taps come from during training: its model, or its
  ``cache`` (checked against the run first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import set_seed
from torch import nn

from distillkit.config import DistillConfig, ModelConfig
from distillkit.models import freeze, load_model
from distillkit.objective.objective import DistillationObjective
from distillkit.objective.taps import NOTHING, TapRequest, Taps
from distillkit.objective.terms import LossTerm, ModelDims
from distillkit.ops import label_cross_entropy
from distillkit.teacher_cache import TeacherCache, expected_meta

if TYPE_CHECKING:
    from distillkit.run.run import Run

CACHE_FIELDS = {"cache", "cache_top_k"}
"""Teacher fields that say where its outputs are read from, not what they are (left out of fingerprints)."""

FINETUNE_RECORD = "finetune.json"
"""Written last into a fine-tuned teacher's directory: its presence means the fine-tuning finished."""


def fingerprint(*parts: Any) -> str:
    """A short SHA-256 of JSON-able parts (12 hex digits)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]


class LabelCrossEntropy(LossTerm):
    """The student's cross-entropy on the task's labels: the objective of a teacher's fine-tuning."""

    name = "label cross-entropy"
    student_reads = TapRequest(logits=True, labels=True)
    uses_teacher = False

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Mean cross-entropy of ``[B, C]`` logits against ``[B]`` labels."""
        return label_cross_entropy(student.logits, student.labels)


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
    data_key = config.data.training_identity()
    key = fingerprint(
        spec.model_dump(exclude=CACHE_FIELDS), data_key, list(label_names), config.train.precision
    )
    name = Path((spec.path or "config").rstrip("/")).name.replace(":", "_")
    return Path(spec.finetune.cache_dir) / f"{name}-{key}"


def load_teacher(run: Run, spec: ModelConfig, finetune: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Loads one teacher, frozen; with ``spec.finetune``, fine-tuned on the task first (once; cached).

    Args:
        run: The run (its config, task, data, tokenizer and accelerator).
        spec: The teacher's model config (``run.config.teacher`` or one of ``run.config.teachers``).
        finetune: False loads a teacher that would be fine-tuned as it is given (benchmarks: fine-tuning
            changes the weights, not the cost).

    Returns:
        The frozen teacher, and what is known of it: ``{"source": ...}``, for a fine-tuned one also its
        ``cache`` directory and ``eval`` metrics.

    """
    config = run.config.model_copy(update={"teacher": spec})
    tune = spec.finetune if finetune else None
    data = run.data
    set_seed(config.data.split_seed)  # a teacher built from `config` is the same in every run and seed
    if tune is None:
        plain = spec.model_copy(update={"finetune": None})
        return freeze(load_model(plain, data.num_labels, "teacher", config.task)), {"source": "as given"}
    eval_key = fingerprint(config.data.model_dump())
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
    accelerator = run.accelerator
    if accelerator.is_main_process:
        print(f"distillkit: fine-tuning the teacher for {tune.steps} steps, once (cached in {cache})")
    teacher = load_model(spec, data.num_labels, "teacher", config.task)
    dims = ModelDims.from_models(teacher, teacher)
    objective = DistillationObjective([(LabelCrossEntropy(LabelCrossEntropy.Params(), dims), 1.0)])
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
            "report_to": [],  # the trackers follow the distillation, not the teacher's fine-tuning
        }
    )
    from distillkit.run.loop import fit

    tuning = dataclasses.replace(
        run,
        config=config,
        objective=objective,
        student=teacher,
        teacher=None,
        teachers={},
        teacher_info={},
        train=train,
        output_dir=cache / "run",
        fingerprint="",
        description="fine-tune teacher",
        strategy=None,  # replicated (ddp): the fine-tuned teacher is saved whole, then sharded if the run is
    )
    result = fit(tuning)
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
        run.tokenizer.save_pretrained(cache)
        done.write_text(json.dumps(info, indent=2), encoding="utf-8")
        (cache / f"eval-{eval_key}.json").write_text(json.dumps(result.eval), encoding="utf-8")
    accelerator.wait_for_everyone()
    return freeze(teacher), info


def teacher_sources(run: Run, models: dict[str, nn.Module]) -> dict[str, nn.Module | TeacherCache]:
    """Where each teacher's taps come from: its cache (``cache:``, checked against this run) or the model.

    Raises:
        ConfigError: If a cache was written for another teacher, data, tokenizer or precision, or lacks
            something a term reads; the message lists the differences.

    """
    config, objective, accelerator = run.config, run.objective, run.accelerator
    requests = objective.teacher_requests()
    sources: dict[str, nn.Module | TeacherCache] = {}
    for name, model in models.items():
        spec = config.teacher_specs()[name]
        if spec.cache is None:
            sources[name] = model
            continue
        cache = TeacherCache(spec.cache)
        student_tokenizer = run.student_tokenizer if run.cross_tokenizer else None
        meta = expected_meta(config, model, run.tokenizer, accelerator.device, student_tokenizer)
        who = "teacher" if name == "teacher" else f"teacher '{name}'"
        cache.check(
            meta, requests.get(name, NOTHING), objective.teacher_layers(name), top_k=spec.cache_top_k, who=who
        )
        if accelerator.is_main_process:
            print(f"distillkit: {who}: outputs read from the cache {spec.cache} ({len(cache)} examples)")
            for note in topk_notes(objective, name, cache):
                print(f"distillkit: note: {note}")
        sources[name] = cache
    return sources


def topk_notes(objective: DistillationObjective, name: str, cache: TeacherCache) -> list[str]:
    """One line per term that reads teacher ``name``'s logits from a top-k cache and is approximate then."""
    if cache.contents.logits != "topk":
        return []
    notes = []
    for label, term in objective.terms.items():
        if name in objective.term_teachers[label].names and term.tap_requests()[1].logits:
            why = term.topk_logits_note()
            if why:
                notes.append(
                    f"objective term '{label}' reads the teacher's logits from a top-{cache.contents.top_k} "
                    f"cache: {why}; use dense logits (no cache_top_k) or a larger cache_top_k "
                    "(docs/teachers.md)"
                )
    return notes
