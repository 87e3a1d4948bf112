"""The study file: base config, variants, seeds, the baseline and the metrics it compares by.

A variant is an objective (a list of terms), or a mapping of an ``objective`` and ``overrides`` of the base
config for that variant only (``train.*`` settings such as ``train.generation``, ``data.*``...)::

    variants:
      kd: [{loss: kd, temperature: 1.0}]
      on-policy:
        objective: [{loss: kd, temperature: 1.0, divergence: reverse_kl}]
        overrides: [train.generation.student_fraction=1.0]
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distillkit.config import DistillConfig, apply_overrides, config_from_dict, safe_load_yaml
from distillkit.errors import ConfigError, quote_input, resolved_against
from distillkit.registry import get_loss

_STUDY_OWNED = ("objective", "output_dir", "train.seed")
"""Config fields the study sets for every run, which a variant's overrides may not change."""


class VariantConfig(BaseModel):
    """One variant: its objective and its own overrides of the base config.

    Attributes:
        objective: The objective term list, as in a distill config.
        overrides: ``key.path=value`` overrides applied after the study's own, for this variant only.

    """

    model_config = ConfigDict(extra="forbid")

    objective: list[dict[str, Any]] = Field(min_length=1)
    overrides: list[str] = Field(default_factory=list)

    @field_validator("overrides")
    @classmethod
    def _study_owned_fields(cls, value: list[str]) -> list[str]:
        for override in value:
            key = override.partition("=")[0].strip()
            owned = next((f for f in _STUDY_OWNED if key == f or key.startswith(f + ".")), None)
            if owned is not None:
                raise ValueError(
                    f"override '{override}' sets {owned}, which the study sets for every run"
                    + (": give the variant's `objective` instead" if owned == "objective" else "")
                )
        return value


class StudyConfig(BaseModel):
    """A study: base config, objective variants, seeds.

    Attributes:
        base: Path of the base distill config (relative to the study file).
        overrides: ``key.path=value`` overrides applied to the base config.
        variants: Variant name -> objective term list, or ``{objective: [...], overrides: [...]}``
            (:class:`VariantConfig`; read back as one).
        baseline: The variant every other one is compared with, paired by seed (default: the first).
        baselines: Variant -> the variant it is compared with instead of ``baseline`` (one that differs from
            it in exactly one thing, e.g. the same model code path without the added term).
        seeds: Training seeds (a list, or ``N`` for ``0 … N-1``); every variant runs once per seed.
        folds: Cross-evaluation: the data is cut into this many parts and the runs of seed ``s`` are scored
            on part ``s mod folds`` and trained on the rest (``data.folds``/``data.fold``), so that the seeds
            together score every example of the data set; None: every run is scored on the one held-out split.
        replicates: Replicates of the two-level bootstrap over seeds and examples.
        teacher_cache: Cache the teacher's outputs once for all runs (false: every run runs the teacher
            itself, as ``--no-teacher-cache``; e.g. a causal LM whose dense ``[T, V]`` logits would take more
            disk than running the teacher costs time).
        metric: The metric (or metrics; the first is plotted) the comparisons are made on (default: the task's
            headline metric).
        threads_per_run: CPU threads of each run. Part of a run's identity: float sums depend on it, so it is
            fixed whatever ``--jobs`` is.
        output_dir: Where runs and results go.

    """

    model_config = ConfigDict(extra="forbid")

    base: str
    overrides: list[str] = Field(default_factory=list)
    variants: dict[str, VariantConfig] = Field(min_length=1)
    baseline: str | None = None
    baselines: dict[str, str] = Field(default_factory=dict)
    seeds: list[int] | int = Field(default_factory=lambda: [0])
    folds: int | None = Field(default=None, ge=2)
    replicates: int = Field(default=2000, ge=100)
    teacher_cache: bool = True
    metric: str | list[str] | None = None
    threads_per_run: int = Field(default=1, ge=1)
    output_dir: str = "runs/study"

    @field_validator("variants", mode="before")
    @classmethod
    def _names_are_paths(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(name)):
                raise ValueError(f"variant name '{name}' may only use letters, digits and _ . + -")
        return {name: {"objective": v} if isinstance(v, list) else v for name, v in value.items()}

    @field_validator("seeds")
    @classmethod
    def _seed_list(cls, value: list[int] | int) -> list[int]:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("seeds: give a positive count or a list of seeds")
            return list(range(value))
        if not value or len(set(value)) != len(value):
            raise ValueError("seeds: give at least one seed, each once")
        return value

    @model_validator(mode="after")
    def _baseline_is_a_variant(self) -> StudyConfig:
        if self.baseline is None:
            self.baseline = next(iter(self.variants))
        elif self.baseline not in self.variants:
            raise ValueError(
                f"baseline '{self.baseline}' is not a variant (variants: {', '.join(self.variants)})"
            )
        for variant, baseline in self.baselines.items():
            for name in (variant, baseline):
                if name not in self.variants:
                    raise ValueError(
                        f"baselines: '{name}' is not a variant (variants: {', '.join(self.variants)})"
                    )
            if variant == baseline or variant == self.baseline:
                raise ValueError(f"baselines: variant '{variant}' cannot have a baseline of its own")
        return self

    def baseline_of(self, variant: str) -> str | None:
        """The variant ``variant`` is compared with (None for the study's baseline itself)."""
        if variant == self.baseline:
            return None
        return self.baselines.get(variant, self.baseline)

    @property
    def seed_list(self) -> list[int]:
        """The seeds, as a list."""
        assert isinstance(self.seeds, list)
        return self.seeds

    def metric_names(self, task_metric: str) -> list[str]:
        """The metrics compared, headline first (``task_metric`` when the study names none)."""
        if self.metric is None:
            return [task_metric]
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)


def load_study(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    output_dir: str | None = None,
) -> tuple[StudyConfig, dict[str, DistillConfig]]:
    """Reads a study and validates the config of every run before any of them starts.

    Args:
        path: The study YAML file.
        overrides: Extra base-config overrides (``--set``), applied after the study's own.
        variants: Run only these of the study's variants.
        seeds: Run only these of the study's seeds.
        output_dir: Write runs and results here instead of the study's ``output_dir``.

    Returns:
        The study and ``{run_id: config}`` (``variant/seed-N``) in run order: every variant of the first seed,
        then of the next.

    Raises:
        ConfigError: For a missing file or an invalid field of the study, the base or any variant, or a metric
            the task does not report.

    """
    from distillkit.tasks import TASKS

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {quote_input(str(path))} does not exist{resolved_against(path)}")
    raw = safe_load_yaml(path.read_text(encoding="utf-8"), source=str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study must be a mapping with base, variants and seeds")
    try:
        study = StudyConfig(**raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid study '{path}': {problems}") from None
    study = _select(study, path, variants, seeds, output_dir)
    base_path = (path.parent / study.base).resolve()
    if not base_path.is_file():
        raise ConfigError(
            f"study '{path}': base config '{study.base}' does not exist (looked at {base_path})"
        )
    base = safe_load_yaml(base_path.read_text(encoding="utf-8"), source=str(base_path))
    if not isinstance(base, dict):
        raise ConfigError(f"base config '{base_path}' must be a mapping")
    base = apply_overrides(base, study.overrides)
    runs: dict[str, DistillConfig] = {}
    for seed in study.seed_list:  # seed by seed: a study stopped early has every variant on its first seeds
        for name, variant in study.variants.items():
            run_id = f"{name}/seed-{seed}"
            try:
                data = apply_overrides(base, [*variant.overrides, *overrides])
                data.update(objective=variant.objective, output_dir=str(Path(study.output_dir) / run_id))
                data["train"] = {**(data.get("train") or {}), "seed": seed}
                data["evaluation"] = {**(data.get("evaluation") or {}), "predictions": True}
                if study.folds is not None:
                    fold = {"folds": study.folds, "fold": seed % study.folds}
                    data["data"] = {**(data.get("data") or {}), **fold}
                runs[run_id] = config_from_dict(data)
                for term in runs[run_id].objective:  # loss parameters too, before any run starts
                    get_loss(term.loss).cls.parse_params(term.params())
            except ConfigError as exc:
                raise ConfigError(f"study variant '{name}': {exc}") from None
    task = TASKS[next(iter(runs.values())).task]
    unknown = [m for m in study.metric_names(task.metric) if m not in task.metrics]
    if unknown:
        raise ConfigError(
            f"study '{path}': task '{task.name}' does not report metric {', '.join(map(repr, unknown))}; "
            f"it reports {', '.join(task.metrics)}"
        )
    return study, runs


def _select(
    study: StudyConfig,
    path: Path,
    variants: Sequence[str] | None,
    seeds: Sequence[int] | None,
    output_dir: str | None,
) -> StudyConfig:
    """The study narrowed to some of its variants and seeds (``--variants``, ``--seeds``), or moved."""
    update: dict[str, Any] = {}
    if variants is not None:
        kept = _subset(path, "variant", variants, list(study.variants), repr)
        update["variants"] = {v: study.variants[v] for v in kept}
        update["baselines"] = {v: b for v, b in study.baselines.items() if v in kept}
    if seeds is not None:
        update["seeds"] = _subset(path, "seed", seeds, study.seed_list, str)
    if output_dir is not None:
        update["output_dir"] = output_dir
    return study.model_copy(update=update)


def _subset(path: Path, kind: str, chosen: Sequence[Any], available: list[Any], show: Any) -> list[Any]:
    """The chosen items in the study's order; an item the study lacks is a ConfigError listing what it has."""
    unknown = [item for item in chosen if item not in available]
    if unknown:
        raise ConfigError(
            f"study '{path}' has no {kind} {', '.join(map(show, unknown))}; "
            f"its {kind}s: {', '.join(map(str, available))}"
        )
    return [item for item in available if item in chosen]


_NOT_IDENTITY = {"output_dir": None, "teacher": {"cache": None}, "train": {"progress": None}}


def _strip(data: dict[str, Any], drop: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if key in drop and drop[key] is None:
            continue
        out[key] = _strip(value, drop[key]) if key in drop and isinstance(value, dict) else value
    return out


def run_identity(config: DistillConfig, threads: int) -> dict[str, Any]:
    """What a run's result depends on: its config (not where it writes, nor its progress bar), threads."""
    return {"config": _strip(config.model_dump(mode="json"), _NOT_IDENTITY), "threads": threads}


def fingerprint(identity: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def identity_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted paths where a run's recorded identity differs from its identity now.

    A config field the record lacks (one a later distillkit version added) is unchanged while it holds its
    default, so upgrading distillkit does not redo a finished study.
    """
    return [
        path
        for path in changed_fields(recorded, current)
        if not _added_at_default(recorded, current, path.split("."))
    ]


def _added_at_default(recorded: dict[str, Any], current: dict[str, Any], path: list[str]) -> bool:
    """Whether config field ``path`` (``config.train.x``) is absent from ``recorded`` and at its default."""
    if path[0] != "config":
        return False
    old, new, model = recorded.get("config"), current.get("config"), DistillConfig
    for key in path[1:]:
        if not isinstance(old, dict) or not isinstance(new, dict) or key not in new:
            return False
        if key not in old:
            field = model.model_fields.get(key)
            if field is None or field.is_required():
                return False
            default = field.get_default(call_default_factory=True)
            default = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
            return new[key] == default
        model = _submodel(model, key)
        if model is None:
            return False
        old, new = old[key], new[key]
    return False


def _submodel(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The pydantic model of field ``key`` of ``model`` (through ``X | None``), or None."""
    field = model.model_fields.get(key)
    if field is None:
        return None
    for candidate in (field.annotation, *get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-able values differ (lists compared whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += changed_fields(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [prefix.rstrip(".") or "<root>"]
