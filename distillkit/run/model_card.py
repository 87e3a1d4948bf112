"""Model cards: the ``README.md`` of a saved student, with the metadata transformers and the model hub read.

The YAML front matter has ``library_name: transformers``, ``base_model`` (the teacher, when it is a hub
model), ``tags`` (``distillation``, ``distillkit``), ``pipeline_tag``, ``datasets`` and ``model-index`` (for
data from the hub), and a ``distillation`` block: the teachers, the objective's terms, the data, and the
final metrics of the student next to the teacher's. The body says the same for people, in the manner of the
cards ``transformers.Trainer`` writes.

``distillkit distill`` writes one into ``<output_dir>/student`` (:func:`run_card`);
``distillkit.hf.DistillationTrainer`` into the folder it saves the student to.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from distillkit.objective.objective import DistillationObjective
from distillkit.objective.teachers import DEFAULT_TEACHER

if TYPE_CHECKING:
    from distillkit.run.run import Run

PIPELINE_TAGS = {
    "sequence_classification": "text-classification",
    "causal_lm": "text-generation",
    "masked_lm": "fill-mask",
    "representation": "feature-extraction",
}
"""distillkit task -> the hub's pipeline tag."""

_TASK_NAMES = {
    "text-classification": "Text Classification",
    "text-generation": "Causal Language Modeling",
    "fill-mask": "Masked Language Modeling",
    "feature-extraction": "Feature Extraction",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COUNTS = {"examples", "positions"}
_TRAINING_KEYS = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio", "max_grad_norm")


@dataclass
class CardInfo:
    """What a student's model card says.

    Attributes:
        model_name: The card's title.
        teachers: Teacher name -> where it came from (a hub name, a path, "built from a config").
        objective: One dict per term (:func:`describe_objective`).
        base_model: The main teacher's hub name, when it has one.
        pipeline_tag: The hub's task tag (``text-classification``...).
        data: What the student was trained on (``path``/``name``, example counts, sequence length).
        dataset_id: The training data's hub name, when it has one.
        student_metrics: The student's final evaluation metrics.
        teacher_metrics: The teacher's, on the same data, when known.
        parameters: ``{"student": n, "teacher": n}`` parameter counts, when known.
        training: The optimisation settings.
        final_losses: Each term's loss (and ``total``) at the end of training.
        results_table: A markdown table of the evaluations during training, when there were several.
        tags: Tags besides ``distillation`` and ``distillkit``.

    """

    model_name: str
    teachers: dict[str, str]
    objective: list[dict[str, Any]]
    base_model: str | None = None
    pipeline_tag: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    dataset_id: str | None = None
    student_metrics: dict[str, float] = field(default_factory=dict)
    teacher_metrics: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    final_losses: dict[str, float] = field(default_factory=dict)
    results_table: str | None = None
    tags: list[str] = field(default_factory=list)


def hub_name(source: str | None) -> str | None:
    """``source`` when it names something on the hub (``org/name`` or ``name``, no local path), else None."""
    if not source or not _HUB_ID.match(source) or Path(source).exists():
        return None
    return source


def describe_objective(objective: DistillationObjective) -> list[dict[str, Any]]:
    """One dict per term: its label, loss, weight, teacher(s) when not the default one, and parameters."""
    terms = []
    for label, term in objective.terms.items():
        entry: dict[str, Any] = {"name": label, "loss": term.name, "weight": objective.weights[label]}
        names = list(objective.term_teachers[label].names)
        if names != [DEFAULT_TEACHER]:
            entry["teacher"] = names[0] if len(names) == 1 else names
        entry.update(term.params.model_dump(mode="json"))
        terms.append(entry)
    return terms


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict (counts and timings as they are)."""
    return {
        key: value
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def card_metadata(info: CardInfo) -> dict[str, Any]:
    """The YAML front matter of the card."""
    metadata: dict[str, Any] = {"library_name": "transformers"}
    if info.base_model:
        metadata["base_model"] = info.base_model
    metadata["tags"] = list(dict.fromkeys(["distillation", "distillkit", *info.tags]))
    if info.pipeline_tag:
        metadata["pipeline_tag"] = info.pipeline_tag
    if info.dataset_id:
        metadata["datasets"] = [info.dataset_id]
    if info.dataset_id and info.pipeline_tag in _TASK_NAMES and info.student_metrics:
        task = {"type": info.pipeline_tag, "name": _TASK_NAMES[info.pipeline_tag]}
        dataset = {"type": info.dataset_id, "name": info.dataset_id}
        metrics = [
            {"type": k, "name": k, "value": v} for k, v in info.student_metrics.items() if k not in _COUNTS
        ]
        metadata["model-index"] = [
            {"name": info.model_name, "results": [{"task": task, "dataset": dataset, "metrics": metrics}]}
        ]
    metadata["distillation"] = {
        "library": f"distillkit {_version()}",
        "teachers": dict(info.teachers),
        "objective": info.objective,
        "data": dict(info.data),
        "metrics": {"student": dict(info.student_metrics), "teacher": dict(info.teacher_metrics)},
    }
    if info.parameters:
        metadata["distillation"]["parameters"] = dict(info.parameters)
    return metadata


def render_model_card(info: CardInfo) -> str:
    """The card: YAML front matter, then results, objective, training and versions in markdown."""
    import torch
    import transformers

    front = yaml.safe_dump(card_metadata(info), sort_keys=False, allow_unicode=True)
    teacher = info.teachers.get(DEFAULT_TEACHER) or next(iter(info.teachers.values()), "a teacher")
    if info.base_model:
        teacher = f"[{info.base_model}](https://huggingface.co/{info.base_model})"
    elif " " not in teacher:
        teacher = f"`{teacher}`"
    data = info.dataset_id or info.data.get("path") or info.data.get("name")
    library = "[distillkit](https://pypi.org/project/distillkit/)"
    lines = [f"---\n{front}---", "", f"# {info.model_name}", ""]
    lines.append(f"A student distilled from {teacher} with {library}" + (f" on `{data}`." if data else "."))
    if len(info.teachers) > 1:
        named = [f"{name} (`{source}`)" for name, source in info.teachers.items()]
        lines.append("Teachers: " + ", ".join(named) + ".")
    rows = [(k, v, info.teacher_metrics.get(k)) for k, v in info.student_metrics.items()]
    if info.parameters:
        rows.append(("parameters", info.parameters.get("student"), info.parameters.get("teacher")))
    if rows:
        lines += ["", "## Results", "", "| metric | student | teacher |", "|---|---:|---:|"]
        lines += [f"| {name} | {_cell(s)} | {_cell(t)} |" for name, s, t in rows]
    lines += [
        "",
        "## Distillation objective",
        "",
        "| term | loss | weight | parameters |",
        "|---|---|---:|---|",
    ]
    for term in info.objective:
        params = {k: v for k, v in term.items() if k not in ("name", "loss", "weight")}
        shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "—"
        lines.append(f"| {term['name']} | {term['loss']} | {term['weight']:g} | {shown} |")
    lines += ["", "## Training", ""]
    lines += [f"- {key}: {value}" for key, value in {**info.data, **info.training}.items()]
    if info.final_losses:
        lines.append("- final losses: " + ", ".join(f"{k} {v:.4f}" for k, v in info.final_losses.items()))
    if info.results_table:
        lines += ["", "### Training results", "", info.results_table.strip()]
    lines += ["", "## Framework versions", "", f"- distillkit {_version()}"]
    lines += [f"- Transformers {transformers.__version__}", f"- PyTorch {torch.__version__}", ""]
    return "\n".join(lines)


def _version() -> str:
    try:
        return importlib.metadata.version("distillkit")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_model_card(directory: str | Path, info: CardInfo) -> Path:
    """Writes ``<directory>/README.md``; returns its path."""
    path = Path(directory) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(info), encoding="utf-8")
    return path


def run_card(run: Run, summary: dict[str, Any]) -> CardInfo:
    """The card of a ``distillkit distill`` run, from its config and summary."""
    config = run.config
    teachers = {}
    for name, spec in config.teacher_specs().items():
        if name == DEFAULT_TEACHER or name in run.teachers:
            teachers[name] = spec.path or "a teacher built from a config"
    if config.teacher.finetune is not None:
        teachers[DEFAULT_TEACHER] += " (fine-tuned on the task first)"
    data_path = config.data.path
    dataset_id = None if data_path is None or data_path.startswith("builtin:") else hub_name(data_path)
    return CardInfo(
        model_name=run.output_dir.resolve().name,
        teachers=teachers,
        objective=describe_objective(run.objective),
        base_model=hub_name(config.teacher.path),
        pipeline_tag=PIPELINE_TAGS.get(config.task),
        data={
            "path": data_path,
            "train_examples": summary.get("train_examples"),
            "eval_examples": summary.get("eval_examples"),
            "max_length": config.data.max_length,
        },
        dataset_id=dataset_id,
        student_metrics=scalar_metrics(summary["student"]["eval"]),
        teacher_metrics=scalar_metrics(summary["teacher"]["eval"]),
        parameters={"student": summary["student"]["parameters"], "teacher": summary["teacher"]["parameters"]},
        training={key: getattr(run.train, key) for key in _TRAINING_KEYS},
        final_losses=dict(summary.get("final_terms", {})),
    )
