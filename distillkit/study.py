"""``distillkit study STUDY.yaml``: objective variants x seeds on one base config, tabulated and plotted.

A study file::

    base: main.yaml               # a distill config, relative to the study file
    overrides: [train.steps=60]   # --set style overrides applied to the base for every run
    variants:                     # name -> objective (a list of terms, as in a distill config)
      none: [{loss: ce}]
      kd: [{loss: kd, temperature: 2.0}]
    seeds: [0, 1, 2]
    metric: accuracy              # accuracy | f1 | loss
    output_dir: runs/study

Each run goes to ``<output_dir>/<variant>/seed-<n>``. The teacher is run once: its outputs are cached in
``<output_dir>/teacher-cache`` (what the union of the variants' objectives reads of it) and every run reads
them from there (``--no-teacher-cache``: each run runs the teacher itself). A run with a ``summary.json`` is
finished and skipped; one with checkpoints is resumed, so an interrupted study continues where it stopped.
The results are written to ``results.md``, ``results.csv``, ``results.json`` and ``results.png`` in
``output_dir``.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from distillkit.config import DistillConfig, apply_overrides, config_from_dict, safe_load_yaml
from distillkit.errors import ConfigError
from distillkit.registry import get_loss


class StudyConfig(BaseModel):
    """A study: base config, objective variants, seeds.

    Attributes:
        base: Path of the base distill config (relative to the study file).
        overrides: ``key.path=value`` overrides applied to the base config.
        variants: Variant name -> objective term list.
        seeds: Training seeds; every variant runs once per seed.
        metric: The evaluation metric the table ranks by.
        output_dir: Where runs and results go.

    """

    model_config = ConfigDict(extra="forbid")

    base: str
    overrides: list[str] = Field(default_factory=list)
    variants: dict[str, list[dict[str, Any]]] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    metric: Literal["accuracy", "f1", "loss"] = "accuracy"
    output_dir: str = "runs/study"

    @field_validator("variants")
    @classmethod
    def _names_are_paths(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
                raise ValueError(f"variant name '{name}' may only use letters, digits and _ . + -")
        return value


def load_study(
    path: str | Path, overrides: Sequence[str] = ()
) -> tuple[StudyConfig, dict[str, DistillConfig]]:
    """Reads a study and validates the config of every run before any of them starts.

    Args:
        path: The study YAML file.
        overrides: Extra base-config overrides (``--set``), applied after the study's own.

    Returns:
        The study and ``{run_id: config}`` in run order (``variant/seed-N``).

    Raises:
        ConfigError: For a missing file or an invalid field of the study, the base or any variant.

    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file '{path}' does not exist")
    raw = safe_load_yaml(path.read_text(encoding="utf-8"), source=str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study must be a mapping with base, variants and seeds")
    try:
        study = StudyConfig(**raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid study '{path}': {problems}") from None
    base_path = (path.parent / study.base).resolve()
    if not base_path.is_file():
        raise ConfigError(
            f"study '{path}': base config '{study.base}' does not exist (looked at {base_path})"
        )
    base = safe_load_yaml(base_path.read_text(encoding="utf-8"), source=str(base_path))
    if not isinstance(base, dict):
        raise ConfigError(f"base config '{base_path}' must be a mapping")
    base = apply_overrides(base, [*study.overrides, *overrides])
    runs: dict[str, DistillConfig] = {}
    for name, objective in study.variants.items():
        for seed in study.seeds:
            run_id = f"{name}/seed-{seed}"
            data = {**base, "objective": objective, "output_dir": str(Path(study.output_dir) / run_id)}
            data["train"] = {**(data.get("train") or {}), "seed": seed}
            try:
                runs[run_id] = config_from_dict(data)
                for term in runs[run_id].objective:  # loss parameters too, before any run starts
                    get_loss(term.loss).cls.parse_params(term.params())
            except ConfigError as exc:
                raise ConfigError(f"study variant '{name}': {exc}") from None
    return study, runs


def fill_teacher_cache(study: StudyConfig, runs: dict[str, DistillConfig]) -> str | None:
    """Caches the main teacher once for every run: what the union of the variants' objectives reads.

    Returns:
        The cache directory, or None when the runs cannot share a cache (a ``masked_lm`` task, a base config
        with its own ``teacher.cache`` or several teachers, or no variant reading the teacher).

    """
    from distillkit.models import load_tokenizer
    from distillkit.taps import NOTHING
    from distillkit.tasks import make_task
    from distillkit.teacher_cache import TeacherCache, cache_teacher
    from distillkit.train import build_objective

    first = next(iter(runs.values()))
    if first.task == "masked_lm" or first.teacher.cache or first.teachers:
        return None
    task = make_task(first)
    data = task.load_data(load_tokenizer(first.teacher))
    request, layers = NOTHING, ()
    for config in runs.values():
        objective = build_objective(config, task, data)
        request = request | objective.teacher_requests().get("teacher", NOTHING)
        mapped = objective.teacher_layers("teacher")
        layers = None if mapped is None or layers is None else tuple(sorted({*layers, *mapped}))
    if not request.needs_forward:
        return None
    directory = Path(study.output_dir) / "teacher-cache"
    if (directory / "index.json").is_file():
        stored = TeacherCache(directory).contents
        holds = (
            (not request.hidden_states or (layers is not None and set(layers) <= set(stored.layers)))
            and (not request.attentions or stored.attentions)
            and (not request.logits or stored.logits is not None)
            and set(request.modules) <= set(stored.modules)
        )
        if holds:  # each run still checks it against its teacher, data and tokenizer
            print(f"[study] teacher outputs cached earlier in {directory}")
            return str(directory)
    print(f"[study] caching the teacher's outputs once in {directory}")
    stats = cache_teacher(first, directory=directory, request=request, layers=layers)
    print(f"[study] teacher cache: {stats['bytes_per_example'] / 1e3:.1f} kB per example")
    return str(directory)


def run_study(
    study_path: str | Path, overrides: Sequence[str] = (), teacher_cache: bool = True
) -> list[dict[str, Any]]:
    """Runs every variant x seed (skipping finished runs), then writes the table and the plot.

    Args:
        study_path: The study YAML file.
        overrides: Extra base-config overrides.
        teacher_cache: Run the teacher once into ``<output_dir>/teacher-cache`` and let every run read it.

    Returns:
        One row per variant (see :func:`summarise`).

    """
    from distillkit.train import distill

    study, runs = load_study(study_path, overrides)
    pending = {k: c for k, c in runs.items() if not (Path(c.output_dir) / "summary.json").exists()}
    cache = fill_teacher_cache(study, pending) if teacher_cache and pending else None
    if cache is not None:
        runs = {
            k: c.model_copy(update={"teacher": c.teacher.model_copy(update={"cache": cache})})
            for k, c in runs.items()
        }
    summaries: dict[str, dict[str, Any]] = {}
    for index, (run_id, config) in enumerate(runs.items(), start=1):
        out = Path(config.output_dir)
        done = out / "summary.json"
        if done.exists():
            print(f"[study {index}/{len(runs)}] {run_id}: finished earlier, skipped")
        else:
            resume = (out / "checkpoints").is_dir()
            print(f"[study {index}/{len(runs)}] {run_id}: {'resuming' if resume else 'running'}")
            started = time.perf_counter()
            summary = distill(config, resume=resume)
            summary["study_seconds"] = time.perf_counter() - started
            done.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        summaries[run_id] = json.loads(done.read_text(encoding="utf-8"))
    rows = summarise(study, summaries)
    write_results(study, rows, summaries)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(study: StudyConfig, summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregates run summaries per variant.

    Args:
        study: The study.
        summaries: ``{variant/seed-N: summary.json}``.

    Returns:
        Per variant: ``variant``, ``runs``, ``<metric>_mean``/``_std``, ``f1_mean``/``_std``,
        ``student_parameters``, ``wall_seconds``, and ``term.<label>`` (mean final loss per term).

    """
    rows = []
    for name in study.variants:
        runs = [s for run_id, s in summaries.items() if run_id.split("/")[0] == name]
        if not runs:
            continue
        row: dict[str, Any] = {"variant": name, "runs": len(runs)}
        for metric in dict.fromkeys([study.metric, "f1"]):
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(
                [r["student"]["eval"][metric] for r in runs]
            )
        row["student_parameters"] = runs[0]["student"]["parameters"]
        row["wall_seconds"] = statistics.fmean(r.get("study_seconds", r["wall_seconds"]) for r in runs)
        labels = dict.fromkeys(label for r in runs for label in r["final_terms"])
        for label in labels:
            row[f"term.{label}"] = statistics.fmean(
                r["final_terms"][label] for r in runs if label in r["final_terms"]
            )
        rows.append(row)
    return rows


def write_results(
    study: StudyConfig, rows: list[dict[str, Any]], summaries: dict[str, dict[str, Any]]
) -> None:
    """Writes ``results.{md,csv,json,png}`` into the study's output directory."""
    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(summaries.values()))
    teacher = first["teacher"]
    terms = list(dict.fromkeys(k for row in rows for k in row if k.startswith("term.") and k != "term.total"))
    terms.append("term.total")
    metric = study.metric
    header = [
        "variant",
        f"{metric} (mean ± std)",
        "macro-F1 (mean ± std)",
        "seeds",
        "student params",
        "wall s",
    ]
    header += [f"final {t[5:]}" for t in terms]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["variant"],
            f"{row[f'{metric}_mean']:.4f} ± {row[f'{metric}_std']:.4f}",
            f"{row['f1_mean']:.4f} ± {row['f1_std']:.4f}",
            str(row["runs"]),
            f"{row['student_parameters']:,}",
            f"{row['wall_seconds']:.0f}",
        ]
        cells += [f"{row[t]:.4f}" if t in row else "–" for t in terms]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Teacher: {metric} {teacher['eval'][metric]:.4f}, macro-F1 {teacher['eval']['f1']:.4f}, "
        f"{teacher['parameters']:,} parameters. Held-out examples: {first['eval_examples']}; "
        f"training examples: {first['train_examples']}; steps per run: {first['steps']}."
    )
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    payload = {"rows": rows, "teacher": teacher["eval"], "teacher_parameters": teacher["parameters"]}
    (out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    plot_results(rows, metric, teacher["eval"][metric], out / "results.png")


def plot_results(rows: list[dict[str, Any]], metric: str, teacher_value: float, path: Path) -> None:
    """Bar chart of the metric per variant (mean ± std over seeds) with the teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["variant"] for row in rows]
    means = [row[f"{metric}_mean"] for row in rows]
    stds = [row[f"{metric}_std"] for row in rows]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 4))
    ax.bar(names, means, yerr=stds, capsize=4, color="#4c72b0")
    ax.axhline(teacher_value, color="#c44e52", linestyle="--", label=f"teacher ({teacher_value:.3f})")
    low = min([m - s for m, s in zip(means, stds, strict=True)] + [teacher_value])
    high = max([m + s for m, s in zip(means, stds, strict=True)] + [teacher_value])
    margin = max(0.01, 0.15 * (high - low))
    ax.set_ylim(low - margin, high + margin)
    ax.set_ylabel(f"student {metric} (mean ± std over seeds)")
    ax.set_xlabel("objective")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
