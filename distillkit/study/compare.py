"""A study's rows: each variant's values over seeds, and its comparison with its baseline.

Each comparison has two lines: the two-level bootstrap over seeds and examples (when the runs kept their
per-example predictions) and the paired t over seeds; each has its p-value adjusted by Holm's method across
all the comparisons of the study (one family per metric), and the smallest difference the design detects at
80% power.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from distillkit.study.bootstrap import BootstrapDifference, SeedPair, two_level_bootstrap
from distillkit.study.spec import StudyConfig
from distillkit.study.stats import PairedDifference, holm, paired_difference, spread
from distillkit.tasks.examples import ExampleMetric

Examples = dict[tuple[str, int], dict[str, tuple[str, dict[str, np.ndarray]]]]
"""``(variant, seed) -> source -> (example-set name, stored columns)``: the runs' per-example predictions."""


def seed_of(run_id: str) -> int:
    """The seed of a run id ``variant/seed-N``."""
    return int(run_id.rsplit("seed-", 1)[1])


def variant_rows(
    study: StudyConfig, summaries: dict[str, dict[str, Any]], task: Any, metrics: list[str]
) -> list[dict[str, Any]]:
    """One row per variant with finished runs: per-seed values, mean and sd per metric, cost, final terms.

    Args:
        study: The study.
        summaries: ``{variant/seed-N: summary.json}``.
        task: The runs' task class (reads metrics out of a summary).
        metrics: The metrics compared.

    Returns:
        Rows with ``variant``, ``runs``, ``values`` (``{metric: {seed: value}}``), ``<metric>_mean``/``_sd``,
        ``student_parameters``, ``wall_seconds`` (mean per run) and ``term.<label>`` (mean final loss).

    """
    rows = []
    for name in study.variants:
        runs = {seed_of(k): s for k, s in summaries.items() if k.split("/")[0] == name}
        if not runs:
            continue
        row: dict[str, Any] = {"variant": name, "runs": len(runs), "values": {}}
        for metric in metrics:
            values = {seed: task.run_metrics(s)[metric] for seed, s in sorted(runs.items())}
            row["values"][metric] = values
            row[f"{metric}_mean"] = statistics.fmean(values.values())
            row[f"{metric}_sd"] = spread(list(values.values()))[0]
        first = next(iter(runs.values()))
        row["student_parameters"] = first["student"]["parameters"]
        row["wall_seconds"] = statistics.fmean(
            r.get("study_seconds", r["wall_seconds"]) for r in runs.values()
        )
        for label in dict.fromkeys(label for r in runs.values() for label in r["final_terms"]):
            row[f"term.{label}"] = statistics.fmean(
                r["final_terms"][label] for r in runs.values() if label in r["final_terms"]
            )
        rows.append(row)
    return rows


def add_comparisons(
    rows: list[dict[str, Any]],
    baseline_of: Callable[[str], str | None],
    metrics: list[str],
    example_metrics: Mapping[str, ExampleMetric],
    examples: Examples,
    replicates: int = 2000,
) -> None:
    """Compares every row that has a baseline with it, and adjusts the p-values by Holm per metric.

    Sets on such a row: ``baseline`` (its name), ``delta`` (``{metric: PairedDifference}``, over seeds),
    ``bootstrap`` (``{metric: BootstrapDifference | None}``, over seeds and examples; None where the runs kept
    no per-example predictions of that metric), ``holm`` and ``holm_t`` (``{metric: adjusted p}`` of the
    bootstrap and of the t test). A row whose baseline has no runs gets no comparison.
    """
    by_name = {row["variant"]: row for row in rows}
    compared = []
    for row in rows:
        base = by_name.get(baseline_of(row["variant"]) or "")
        if base is None:
            continue
        row["baseline"] = base["variant"]
        row["delta"] = {m: paired_difference(base["values"][m], row["values"][m]) for m in metrics}
        row["bootstrap"] = {}
        for metric in metrics:
            pairs = seed_pairs(examples, base["variant"], row["variant"], example_metrics.get(metric))
            row["bootstrap"][metric] = (
                two_level_bootstrap(pairs, example_metrics[metric].value, replicates) if pairs else None
            )
        compared.append(row)
    for metric in metrics:
        boot = [row["bootstrap"][metric] for row in compared]
        t_adjusted = holm([row["delta"][metric].p_value for row in compared])
        b_adjusted = holm([b.p_value if b is not None else float("nan") for b in boot])
        for row, t_p, b_p, b in zip(compared, t_adjusted, b_adjusted, boot, strict=True):
            row.setdefault("holm_t", {})[metric] = t_p
            row.setdefault("holm", {})[metric] = b_p if b is not None else None


def seed_pairs(
    examples: Examples, baseline: str, variant: str, metric: ExampleMetric | None
) -> list[SeedPair] | None:
    """The seeds both variants ran with predictions of ``metric``'s example set, aligned example by example.

    Returns:
        The pairs, or None when there are fewer than two such seeds, when ``metric`` cannot be recomputed
        from examples, or when a seed's two runs scored different examples.

    """
    if metric is None:
        return None
    pairs = []
    seeds = sorted({s for v, s in examples if v == baseline} & {s for v, s in examples if v == variant})
    for seed in seeds:
        base, other = (
            examples[(baseline, seed)].get(metric.source),
            examples[(variant, seed)].get(metric.source),
        )
        if base is None or other is None:
            continue
        (base_name, base_cols), (other_name, other_cols) = _sorted(base), _sorted(other)
        if base_name != other_name or not np.array_equal(base_cols["example_id"], other_cols["example_id"]):
            return None
        try:
            pairs.append(SeedPair(seed, base_name, metric.columns(base_cols), metric.columns(other_cols)))
        except KeyError:  # a column the metric needs was not kept
            return None
    return pairs if len(pairs) >= 2 else None


def _sorted(entry: tuple[str, dict[str, np.ndarray]]) -> tuple[str, dict[str, np.ndarray]]:
    name, columns = entry
    order = np.argsort(columns["example_id"], kind="stable")
    return name, {k: np.asarray(v)[order] for k, v in columns.items()}


def load_predictions(output_dirs: Mapping[str, str | Path]) -> Examples:
    """Reads every run's ``predictions.json`` (runs without one are left out).

    Args:
        output_dirs: ``{variant/seed-N: run directory}``.

    Returns:
        The per-example predictions by ``(variant, seed)``.

    """
    from distillkit.run.predictions import PREDICTIONS_FILE

    found: Examples = {}
    for run_id, directory in output_dirs.items():
        path = Path(directory) / PREDICTIONS_FILE
        if not path.is_file():
            continue
        payload = json.loads(path.read_text(encoding="utf-8"))
        found[(run_id.split("/")[0], seed_of(run_id))] = {
            source: (entry["examples"], as_arrays(entry["columns"])) for source, entry in payload.items()
        }
    return found


def as_arrays(columns: Mapping[str, list]) -> dict[str, np.ndarray]:
    """JSON/CSV columns as float64 arrays (missing values as NaN)."""
    return {
        k: np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        for k, values in columns.items()
    }


def verdict(row: dict[str, Any], metric: str) -> tuple[bool, float, float]:
    """Whether the comparison of ``row`` detects a difference in ``metric``, its Holm p and detectable size.

    The two-level bootstrap decides where the runs kept per-example predictions, else the paired t over
    seeds; detected means a Holm-adjusted p-value below 0.05.
    """
    boot: BootstrapDifference | None = row["bootstrap"].get(metric)
    delta: PairedDifference = row["delta"][metric]
    if boot is not None:
        return row["holm"][metric] < 0.05, row["holm"][metric], boot.detectable()
    return row["holm_t"][metric] < 0.05, row["holm_t"][metric], delta.detectable()
