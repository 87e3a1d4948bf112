"""A study's figure, and the curves behind its step counts.

:func:`plot_results` draws one row of two panels per compared metric. Left: every seed's value per variant,
one colour per seed, a seed's runs joined across variants (pairing is visible: lines that run parallel are
a consistent difference, crossing lines are seed noise), the mean as a bar beside the seeds. Right: every
seed's difference to the variant's baseline, with the intervals (seeds × examples, and seeds only) drawn
beside the seeds, never on them.

:func:`plot_curves` draws held-out metric curves over training steps from a curves CSV
(``run,step,<metric>...``), which :func:`curves_from_runs` writes from runs' ``metrics.jsonl``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SEED_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _offsets(seeds: list[int]) -> dict[int, float]:
    """A fixed horizontal offset per seed, within ±0.18 of the variant's position."""
    step = 0.36 / max(len(seeds) - 1, 1)
    return {s: -0.18 + i * step if len(seeds) > 1 else 0.0 for i, s in enumerate(seeds)}


def plot_results(info: Any, rows: list[dict[str, Any]], path: Path) -> None:
    """Writes the study's figure to ``path`` (see the module docstring).

    Args:
        info: The report's :class:`~distillkit.study.report.ReportInfo` (metrics, baseline, teacher).
        rows: Rows with ``values`` and, for compared variants, ``delta``/``bootstrap``/``baseline``.
        path: The PNG file.

    """
    plt = _pyplot()
    metrics = info.metrics
    names = [row["variant"] for row in rows]
    seeds = sorted({s for row in rows for m in metrics for s in row["values"][m]})
    colour = {s: SEED_COLOURS[i % len(SEED_COLOURS)] for i, s in enumerate(seeds)}
    offset = _offsets(seeds)
    compared = [row for row in rows if "delta" in row]
    width = max(2.0 + 1.1 * len(rows), 6.0) + max(2.0 + 1.1 * len(compared), 5.0)
    fig, axes = plt.subplots(len(metrics), 2, figsize=(width, 3.8 * len(metrics)), squeeze=False)
    for m, metric in enumerate(metrics):
        left, right = axes[m]
        for seed in seeds:
            xs = [i + offset[seed] for i, row in enumerate(rows) if seed in row["values"][metric]]
            ys = [row["values"][metric][seed] for row in rows if seed in row["values"][metric]]
            left.plot(xs, ys, "-", color=colour[seed], alpha=0.35, linewidth=1, zorder=2)
            left.scatter(xs, ys, s=18, color=colour[seed], zorder=3, label=f"seed {seed}")
        for i, row in enumerate(rows):
            left.hlines(row[f"{metric}_mean"], i + 0.24, i + 0.42, color="#222222", linewidth=2.5, zorder=4)
        teacher = info.teacher.get(metric)
        if teacher is not None:
            left.axhline(
                teacher, color="#c44e52", linestyle="--", linewidth=1, label=f"teacher ({teacher:.3f})"
            )
        left.set_xticks(range(len(names)), names, rotation=20, ha="right")
        left.set_xlim(-0.5, len(names) - 0.4)
        left.set_ylabel(f"student {metric}")
        left.set_title(f"{metric}: every seed (a seed's runs joined), bar = mean", fontsize=9)
        if m == 0:
            left.legend(loc="best", fontsize=7, ncol=2)
        _plot_differences(right, compared, metric, seeds, colour, offset)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_differences(axis: Any, compared: list[dict[str, Any]], metric: str, seeds, colour, offset) -> None:
    """Per comparison: every seed's difference, and beside them the bootstrap and the t interval."""
    axis.axhline(0.0, color="#888888", linewidth=1)
    labelled = set()
    for i, row in enumerate(compared):
        delta, boot = row["delta"][metric], row["bootstrap"][metric]
        for seed, value in zip(delta.seeds, delta.differences, strict=True):
            axis.scatter(i + offset[seed], value, s=18, color=colour[seed], zorder=3)
        intervals = [("seeds × examples (bootstrap)", boot, "#222222", 0.28)] if boot is not None else []
        intervals.append(("seeds (paired t)", delta, "#999999", 0.38))
        for label, interval, shade, dx in intervals:
            if interval.low != interval.low:  # NaN: fewer than two seeds
                continue
            axis.errorbar(
                i + dx,
                delta.mean,
                yerr=[[delta.mean - interval.low], [interval.high - delta.mean]],
                fmt="o",
                markersize=4,
                color=shade,
                capsize=4,
                zorder=4,
                label=None if label in labelled else f"mean, 95% CI: {label}",
            )
            labelled.add(label)
    axis.set_xticks(
        range(len(compared)),
        [f"{r['variant']}\nvs {r['baseline']}" for r in compared],
        rotation=20,
        ha="right",
    )
    axis.set_xlim(-0.5, len(compared) - 0.4)
    axis.set_ylabel(f"Δ {metric}")
    axis.set_title(f"Δ {metric} per seed; intervals beside the seeds", fontsize=9)
    if labelled:
        axis.legend(loc="best", fontsize=7)


def curves_from_runs(runs: Mapping[str, str | Path], path: Path) -> list[dict[str, Any]]:
    """Writes a curves CSV from runs' held-out evaluations (the ``eval`` records of ``metrics.jsonl``).

    Args:
        runs: Curve label -> run directory.
        path: The CSV to write (``run,step,<metric>...``).

    Returns:
        The rows written.

    """
    from distillkit.run.runlog import read_jsonl

    rows = []
    for label, directory in runs.items():
        for record in read_jsonl(Path(directory) / "metrics.jsonl"):
            if record.get("split") == "eval":
                values = {
                    k: v for k, v in record.items() if k not in ("split", "step") and isinstance(v, float)
                }
                rows.append({"run": label, "step": record["step"], **values})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def plot_curves(csv_path: Path, metric: str, path: Path, marks: Mapping[str, int] | None = None) -> None:
    """Plots ``metric`` against the step for every run of a curves CSV.

    Args:
        csv_path: ``run,step,<metric>...`` rows.
        metric: The column to plot.
        path: The PNG file.
        marks: Label -> step of a vertical line (e.g. the step count a study uses).

    """
    plt = _pyplot()
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(csv_path, encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle):
            curves.setdefault(record["run"], []).append((int(record["step"]), float(record[metric])))
    fig, axis = plt.subplots(figsize=(7.5, 4.2))
    for label, points in curves.items():
        axis.plot(*zip(*sorted(points), strict=True), "o-", label=label)
    for label, step in (marks or {}).items():
        axis.axvline(step, color="#888888", linestyle=":", linewidth=1)
        axis.text(step, axis.get_ylim()[0], f" {label}", fontsize=8, color="#555555", va="bottom")
    axis.set_xlabel("step")
    axis.set_ylabel(metric)
    axis.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
