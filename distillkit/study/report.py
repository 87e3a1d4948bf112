"""A finished study's results: per-variant rows with paired differences, the table, CSV, JSON and plot."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from distillkit.study.spec import StudyConfig
from distillkit.study.stats import PairedDifference, paired_difference, spread

RESULT_FILES = ("results.md", "results.csv", "results.json", "results.png")


def _seed_of(run_id: str) -> int:
    return int(run_id.rsplit("seed-", 1)[1])


def summarise(
    study: StudyConfig, summaries: dict[str, dict[str, Any]], task: Any, metrics: list[str]
) -> list[dict[str, Any]]:
    """One row per variant: per-seed values, mean and sd per metric, the paired difference to the baseline.

    Args:
        study: The study.
        summaries: ``{variant/seed-N: summary.json}``.
        task: The runs' task class (reads metrics out of a summary).
        metrics: The metrics compared.

    Returns:
        Rows with ``variant``, ``runs``, ``values`` (``{metric: {seed: value}}``), ``<metric>_mean``/``_sd``,
        ``delta`` (``{metric: PairedDifference}``; the baseline's own row has none), ``student_parameters``,
        ``wall_seconds`` (mean per run) and ``term.<label>`` (mean final loss per term).

    """
    rows = []
    for name in study.variants:
        runs = {_seed_of(k): s for k, s in summaries.items() if k.split("/")[0] == name}
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
    base = next((r for r in rows if r["variant"] == study.baseline), None)
    for row in rows:
        if base is not None and row is not base:
            row["delta"] = {m: paired_difference(base["values"][m], row["values"][m]) for m in metrics}
    return rows


def _delta_cell(delta: PairedDifference | None) -> str:
    if delta is None:
        return "(baseline)"
    if delta.n < 2:
        return f"{delta.mean:+.4f} (n={delta.n}, no interval)"
    mark = " *" if delta.excludes_zero else ""
    return f"{delta.mean:+.4f} [{delta.low:+.4f}, {delta.high:+.4f}]{mark}"


def comparison_table(study: StudyConfig, rows: list[dict[str, Any]], metrics: list[str]) -> list[str]:
    """The Markdown comparison table: mean ± sd per metric and the paired difference to the baseline."""
    header = ["variant", "seeds"]
    for metric in metrics:
        header += [f"{metric} (mean ± sd)", f"Δ {metric} vs {study.baseline} [95% CI]"]
    header.append("wall s / run")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], str(row["runs"])]
        for metric in metrics:
            cells.append(f"{row[f'{metric}_mean']:.4f} ± {row[f'{metric}_sd']:.4f}")
            cells.append(_delta_cell(row.get("delta", {}).get(metric)))
        cells.append(f"{row['wall_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def noise_floor(study: StudyConfig, rows: list[dict[str, Any]], metrics: list[str]) -> list[str]:
    """Sentences on how much the baseline alone moves across seeds."""
    base = next((r for r in rows if r["variant"] == study.baseline), None)
    if base is None or base["runs"] < 2:
        return []
    parts = []
    for metric in metrics:
        sd, width = spread(list(base["values"][metric].values()))
        parts.append(f"{metric} sd {sd:.4f}, range {width:.4f}")
    who = f"the baseline `{study.baseline}` alone across its {base['runs']} seeds"
    return [f"Noise floor — {who}: {'; '.join(parts)}."]


def write_results(
    study: StudyConfig,
    rows: list[dict[str, Any]],
    summaries: dict[str, dict[str, Any]],
    task: Any,
    metrics: list[str],
    missing: int = 0,
) -> list[str]:
    """Writes ``results.{md,csv,json,png}`` into the study's output directory.

    Args:
        study: The study.
        rows: :func:`summarise` rows.
        summaries: The finished runs' summaries.
        task: The runs' task class.
        metrics: The compared metrics.
        missing: Runs of the study not finished (a partial report says so at the top).

    Returns:
        The lines of ``results.md`` (also what ``distillkit study`` prints at the end).

    """
    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(summaries.values()))
    teacher = task.run_metrics(first, "teacher")
    lines = comparison_table(study, rows, metrics)
    if missing:
        total = len(summaries) + missing
        lines = [f"**Partial: {len(summaries)} of {total} runs finished.**", "", *lines]
    lines += [
        "",
        f"Δ = variant − `{study.baseline}`, paired by seed (same initialisation and data order); 95% "
        "paired t interval over the seeds both ran (Student's t, n − 1 degrees of freedom); * marks an "
        "interval that excludes zero.",
        *noise_floor(study, rows, metrics),
        "Teacher: "
        + (", ".join(f"{m} {teacher[m]:.4f}" for m in metrics if m in teacher) or "not evaluated")
        + f" ({first['teacher']['parameters']:,} parameters). Student: {first['student']['parameters']:,} "
        f"parameters. Held-out examples: {first['eval_examples']}; training examples: "
        f"{first['train_examples']}; steps per run: {first['steps']}.",
    ]
    terms = list(dict.fromkeys(k for row in rows for k in row if k.startswith("term.")))
    if terms:
        lines += ["", "Final training loss per term (mean over seeds):", ""]
        lines += ["| variant | " + " | ".join(t[5:] for t in terms) + " |", "|" + "---|" * (len(terms) + 1)]
        for row in rows:
            cells = [f"{row[t]:.4f}" if t in row else "–" for t in terms]
            lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    flat = [_flat_row(row, metrics) for row in rows]
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in flat for k in row)))
        writer.writeheader()
        writer.writerows(flat)
    payload = {
        "baseline": study.baseline,
        "metrics": metrics,
        "interval": "95% paired t over seeds",
        "rows": [_json_row(row) for row in rows],
        "teacher": teacher,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    plot_results(study, rows, metrics[0], teacher.get(metrics[0]), out / "results.png")
    return lines


def _flat_row(row: dict[str, Any], metrics: list[str]) -> dict[str, Any]:
    flat = {k: v for k, v in row.items() if k not in ("values", "delta")}
    for metric in metrics:
        delta = row.get("delta", {}).get(metric)
        flat[f"{metric}_delta"] = delta.mean if delta else ""
        flat[f"{metric}_delta_low"] = delta.low if delta else ""
        flat[f"{metric}_delta_high"] = delta.high if delta else ""
        for seed, value in row["values"][metric].items():
            flat[f"{metric}_seed{seed}"] = value
    return flat


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k != "delta"}
    out["values"] = {m: {str(s): v for s, v in vals.items()} for m, vals in row["values"].items()}
    if "delta" in row:
        out["delta"] = {
            m: {"mean": d.mean, "low": d.low, "high": d.high, "n": d.n, "excludes_zero": d.excludes_zero}
            for m, d in row["delta"].items()
        }
    return out


def plot_results(
    study: StudyConfig, rows: list[dict[str, Any]], metric: str, teacher_value: float | None, path: Path
) -> None:
    """Two panels: every seed's metric per variant with the mean; the paired difference to the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["variant"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(2.2 * len(rows) + 3, 4.2))
    for i, row in enumerate(rows):
        values = list(row["values"][metric].values())
        offsets = [(j - (len(values) - 1) / 2) * 0.06 for j in range(len(values))]
        left.scatter([i + o for o in offsets], values, s=14, color="#4c72b0", alpha=0.7, zorder=3)
        left.hlines(statistics.fmean(values), i - 0.3, i + 0.3, color="#222222", zorder=4)
        delta = row.get("delta", {}).get(metric)
        if delta is not None and delta.n:
            right.scatter(
                [i + o for o in offsets[: delta.n]], delta.differences, s=14, color="#55a868", zorder=3
            )
            if delta.n >= 2:
                right.errorbar(
                    i,
                    delta.mean,
                    yerr=[[delta.mean - delta.low], [delta.high - delta.mean]],
                    fmt="o",
                    color="#222222",
                    capsize=5,
                    zorder=4,
                )
    if teacher_value is not None:
        left.axhline(teacher_value, color="#c44e52", linestyle="--", label=f"teacher ({teacher_value:.3f})")
        left.legend(loc="best", fontsize=8)
    left.set_xticks(range(len(names)), names, rotation=20, ha="right")
    left.set_ylabel(f"student {metric}: every seed, line = mean")
    right.axhline(0.0, color="#888888", linewidth=1)
    right.set_xticks(range(len(names)), names, rotation=20, ha="right")
    right.set_ylabel(f"Δ {metric} vs {study.baseline}: per seed, mean ± 95% CI")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
