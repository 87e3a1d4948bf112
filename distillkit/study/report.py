"""A study's report: the Markdown tables and plain-words lines, the CSV, JSON and plot, and the examples file.

Everything a report shows is recomputed from two files, so a committed study can be regenerated without its
runs (:func:`regenerate`): ``<prefix>.csv`` (every seed's value of every metric, per variant) with
``<prefix>.json`` (baselines, metrics, teacher, notes), and ``<prefix>-examples.csv.gz`` (every run's
per-example predictions, when they were kept).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillkit.study.compare import Examples, add_comparisons, as_arrays, verdict
from distillkit.study.plots import plot_results
from distillkit.study.stats import spread

RESULT_FILES = ("results.md", "results.csv", "results.json", "results.png", "results-examples.csv.gz")


@dataclass
class ReportInfo:
    """What a report says besides the rows.

    Attributes:
        task: The task name (its metrics' per-example definitions).
        baseline: The study's baseline variant.
        baselines: Variant -> its own baseline, where it is not ``baseline``.
        metrics: The compared metrics, headline first.
        teacher: The teacher's metrics.
        notes: Lines on the design (teacher and student sizes, examples, steps).
        replicates: Bootstrap replicates.
        missing: Runs not finished (a partial report says so).

    """

    task: str
    baseline: str
    baselines: dict[str, str] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    teacher: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    replicates: int = 2000
    missing: int = 0

    def baseline_of(self, variant: str) -> str | None:
        """The variant ``variant`` is compared with (None for the baseline itself)."""
        return None if variant == self.baseline else self.baselines.get(variant, self.baseline)


def _num(value: float, digits: int = 4, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _pv(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _p(p: float | None, adjusted: float | None) -> str:
    if p is None or math.isnan(p):
        return "–"
    star = " *" if adjusted is not None and adjusted < 0.05 else ""
    return f"{_pv(p)} ({_pv(adjusted)}){star}"


def comparison_table(info: ReportInfo, rows: list[dict[str, Any]], metric: str) -> list[str]:
    """The Markdown table of one metric: every variant, and each comparison's two intervals and power."""
    header = [
        "variant", "vs", "seeds", f"{metric} (mean ± sd)", "Δ", "95% CI, seeds × examples", "p (Holm)",
        "95% CI, seeds (paired t)", "p (Holm)", "detectable Δ (80% power)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], row.get("baseline", ""), str(row["runs"])]
        cells.append(f"{_num(row[f'{metric}_mean'])} ± {_num(row[f'{metric}_sd'])}")
        if "delta" not in row:
            cells += ["(baseline)" if row["variant"] == info.baseline else "(no baseline runs)"] + [""] * 5
        else:
            delta, boot = row["delta"][metric], row["bootstrap"][metric]
            cells.append(_num(delta.mean, sign=True))
            if boot is None:
                cells += ["needs per-example predictions", "–"]
            else:
                cells += [f"[{_num(boot.low, sign=True)}, {_num(boot.high, sign=True)}]"]
                cells += [_p(boot.p_value, row["holm"][metric])]
            cells.append(f"[{_num(delta.low, sign=True)}, {_num(delta.high, sign=True)}]")
            cells.append(_p(delta.p_value, row["holm_t"][metric]))
            detected, _, size = verdict(row, metric)
            cells.append(_num(size) + (" (seeds only)" if boot is None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plain_words(info: ReportInfo, rows: list[dict[str, Any]], metric: str) -> list[str]:
    """One sentence per comparison: what was detected, and how large a difference would have been seen."""
    lines = []
    for row in rows:
        if "delta" not in row:
            continue
        detected, p, size = verdict(row, metric)
        mean = row["delta"][metric].mean
        what = f"`{row['variant']}` − `{row['baseline']}`: {_num(mean, sign=True)} {metric}"
        if detected:
            side = "higher" if mean > 0 else "lower"
            lines.append(f"- {what}: {side}, a difference detected (Holm p {_pv(p)}).")
        elif row["delta"][metric].n < 2:
            lines.append(f"- {what}: too few seeds to test.")
        elif math.isnan(size):
            lines.append(f"- {what}: no difference detected; the runs did not vary: no power to give.")
        else:
            lines.append(
                f"- {what}: no difference detected (Holm p {p:.2f}); a difference larger than {size:.4f} "
                "would have been seen (80% power)."
            )
    return lines


def method_lines(info: ReportInfo, rows: list[dict[str, Any]]) -> list[str]:
    """How the comparisons were made, in one paragraph."""
    compared = sum(1 for row in rows if "delta" in row)
    with_examples = any(b is not None for row in rows for b in row.get("bootstrap", {}).values())
    plural = "s" if compared != 1 else ""
    text = (
        "Δ = variant − the variant in `vs`, paired by seed (same initialisation and data order). Seeds × "
        f"examples: the 95% percentile interval of a paired two-level bootstrap ({info.replicates} "
        "replicates: the seeds resampled, then the evaluation examples, the same examples for both runs of "
        "a seed) and its two-sided p-value. Seeds: the 95% paired t interval over the seeds (Student's t, "
        "n − 1 degrees of freedom) and its p-value. In parentheses: p adjusted by Holm's method over the "
        f"{compared} comparison{plural} of the metric; * marks an adjusted p below 0.05. Detectable Δ: the "
        "smallest difference this design detects with 80% probability at α = 0.05 (two-sided t test, "
        "noncentral t), from the observed seed and example variances"
    )
    if not with_examples:
        text += (
            " — here from the seeds alone: these runs kept no per-example predictions, so the example-level "
            "part of the uncertainty (the finite evaluation set) is not in it"
        )
    return [text + "."]


def noise_floor(info: ReportInfo, rows: list[dict[str, Any]]) -> list[str]:
    """Sentences on how much the baseline alone moves across seeds."""
    base = next((r for r in rows if r["variant"] == info.baseline), None)
    if base is None or base["runs"] < 2:
        return []
    parts = []
    for metric in info.metrics:
        sd, width = spread(list(base["values"][metric].values()))
        parts.append(f"{metric} sd {sd:.4f}, range {width:.4f}")
    who = f"the baseline `{info.baseline}` alone across its {base['runs']} seeds"
    return [f"Noise floor — {who}: {'; '.join(parts)}."]


def markdown(info: ReportInfo, rows: list[dict[str, Any]]) -> list[str]:
    """The lines of ``results.md`` (also what ``distillkit study`` prints at the end)."""
    lines = []
    if info.missing:
        total = sum(row["runs"] for row in rows) + info.missing
        lines += [f"**Partial: {total - info.missing} of {total} runs finished.**", ""]
    for metric in info.metrics:
        lines += [
            f"**{metric}**",
            "",
            *comparison_table(info, rows, metric),
            "",
            *plain_words(info, rows, metric),
        ]
        lines.append("")
    lines += method_lines(info, rows)
    lines += noise_floor(info, rows)
    teacher = ", ".join(f"{m} {info.teacher[m]:.4f}" for m in info.metrics if m in info.teacher)
    lines.append(f"Teacher: {teacher or 'not evaluated'}.")
    lines += info.notes
    terms = list(dict.fromkeys(k for row in rows for k in row if k.startswith("term.")))
    if terms:
        lines += ["", "Final training loss per term (mean over seeds):", ""]
        lines += ["| variant | " + " | ".join(t[5:] for t in terms) + " |", "|" + "---|" * (len(terms) + 1)]
        for row in rows:
            cells = [f"{row[t]:.4f}" if isinstance(row.get(t), float) else "–" for t in terms]
            lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return lines


def write_report(prefix: Path, info: ReportInfo, rows: list[dict[str, Any]], examples: Examples) -> list[str]:
    """Writes ``<prefix>.md``, ``.csv``, ``.json``, ``.png`` and (with predictions) ``-examples.csv.gz``.

    Returns:
        The lines of the Markdown report.

    """
    prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = markdown(info, rows)
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    flat = [_flat_row(row, info.metrics) for row in rows]
    with open(prefix.with_suffix(".csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in flat for k in row)))
        writer.writeheader()
        writer.writerows(flat)
    payload = {
        "task": info.task,
        "baseline": info.baseline,
        "baselines": info.baselines,
        "metrics": info.metrics,
        "replicates": info.replicates,
        "teacher": info.teacher,
        "notes": info.notes,
        "rows": [_json_row(row) for row in rows],
    }
    prefix.with_suffix(".json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    if examples:
        write_examples(Path(f"{prefix}-examples.csv.gz"), examples)
    plot_results(info, rows, prefix.with_suffix(".png"))
    return lines


def _flat_row(row: dict[str, Any], metrics: list[str]) -> dict[str, Any]:
    flat = {k: v for k, v in row.items() if k not in ("values", "delta", "bootstrap", "holm", "holm_t")}
    flat["baseline"] = row.get("baseline", "")
    for metric in metrics:
        delta, boot = row.get("delta", {}).get(metric), row.get("bootstrap", {}).get(metric)
        flat[f"{metric}_delta"] = delta.mean if delta else ""
        flat[f"{metric}_delta_low"] = delta.low if delta else ""
        flat[f"{metric}_delta_high"] = delta.high if delta else ""
        flat[f"{metric}_p"] = delta.p_value if delta else ""
        flat[f"{metric}_p_holm"] = row["holm_t"][metric] if delta else ""
        flat[f"{metric}_boot_low"] = boot.low if boot else ""
        flat[f"{metric}_boot_high"] = boot.high if boot else ""
        flat[f"{metric}_boot_p"] = boot.p_value if boot else ""
        flat[f"{metric}_boot_p_holm"] = row["holm"][metric] if boot else ""
        flat[f"{metric}_detectable"] = verdict(row, metric)[2] if delta else ""
        for seed, value in row["values"][metric].items():
            flat[f"{metric}_seed{seed}"] = value
    return flat


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in ("delta", "bootstrap", "holm", "holm_t")}
    out["values"] = {m: {str(s): v for s, v in vals.items()} for m, vals in row["values"].items()}
    if "delta" in row:
        out["comparison"] = {}
        for metric, d in row["delta"].items():
            boot = row["bootstrap"][metric]
            out["comparison"][metric] = {
                "mean": d.mean,
                "t": {
                    "low": d.low,
                    "high": d.high,
                    "p": d.p_value,
                    "p_holm": row["holm_t"][metric],
                    "n": d.n,
                },
                "bootstrap": None
                if boot is None
                else {
                    "low": boot.low,
                    "high": boot.high,
                    "p": boot.p_value,
                    "p_holm": row["holm"][metric],
                    "seed_variance": boot.seed_variance,
                    "example_variance": boot.example_variance,
                    "examples": boot.examples,
                },
                "detectable": verdict(row, metric)[2],
            }
    return out


# -- the examples file ---------------------------------------------------------------------------------------
def write_examples(path: Path, examples: Examples) -> None:
    """Every run's per-example columns in one long CSV, gzip-compressed (byte-identical for equal data)."""
    columns = list(dict.fromkeys(c for sets in examples.values() for _, cols in sets.values() for c in cols))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["variant", "seed", "source", "examples", *columns])
    for (variant, seed), sets in sorted(examples.items()):
        for source, (name, cols) in sets.items():
            values = [cols.get(c) for c in columns]
            for i in range(len(cols["example_id"])):
                writer.writerow([variant, seed, source, name, *(_cell(v, i) for v in values)])
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as handle:
        handle.write(buffer.getvalue().encode("utf-8"))


def _cell(values: Any, i: int) -> str:
    if values is None:
        return ""
    value = float(values[i])
    return "" if math.isnan(value) else (str(int(value)) if value.is_integer() else f"{value:.9g}")


def read_examples(path: Path) -> Examples:
    """Reads :func:`write_examples`' file back."""
    grouped: dict[tuple[str, int], dict[str, tuple[str, dict[str, list]]]] = defaultdict(dict)
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle):
            key = (record.pop("variant"), int(record.pop("seed")))
            source, name = record.pop("source"), record.pop("examples")
            entry = grouped[key].setdefault(source, (name, defaultdict(list)))
            for column, value in record.items():
                entry[1][column].append(float(value) if value != "" else None)
    return {
        key: {
            source: (name, as_arrays({k: v for k, v in cols.items() if any(x is not None for x in v)}))
            for source, (name, cols) in sets.items()
        }
        for key, sets in grouped.items()
    }


# -- regenerating a committed study --------------------------------------------------------------------------
def rows_from_csv(path: Path, metrics: list[str]) -> list[dict[str, Any]]:
    """The per-variant rows of a results CSV: every seed's values, run counts, cost and final terms."""
    rows = []
    with open(path, encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle):
            row: dict[str, Any] = {"variant": record["variant"], "runs": int(record["runs"]), "values": {}}
            for metric in metrics:
                seeds = {
                    int(m.group(1)): float(v)
                    for k, v in record.items()
                    if v != "" and (m := re.fullmatch(rf"{re.escape(metric)}_seed(\d+)", k))
                }
                row["values"][metric] = dict(sorted(seeds.items()))
                row[f"{metric}_mean"] = sum(seeds.values()) / len(seeds)
                row[f"{metric}_sd"] = spread(list(seeds.values()))[0]
            row["student_parameters"] = int(record["student_parameters"])
            row["wall_seconds"] = float(record["wall_seconds"])
            for key, value in record.items():
                if key.startswith("term.") and value != "":
                    row[key] = float(value)
            rows.append(row)
    return rows


def regenerate(prefix: str | Path) -> list[str]:
    """Recomputes a study's statistics, table and plot from its committed files, without its runs.

    Reads ``<prefix>.csv`` (every seed's values), ``<prefix>.json`` (baselines, metrics, teacher, notes) and,
    when it exists, ``<prefix>-examples.csv.gz``; writes ``<prefix>.md``, ``.csv``, ``.json`` and ``.png``.

    Returns:
        The lines of the Markdown report.

    """
    from distillkit.tasks import TASKS

    prefix = Path(prefix)
    meta = json.loads(prefix.with_suffix(".json").read_text(encoding="utf-8"))
    metrics = list(meta["metrics"])
    task = meta.get("task") or next(name for name, t in TASKS.items() if set(metrics) <= set(t.metrics))
    info = ReportInfo(
        task=task,
        baseline=meta["baseline"],
        baselines=meta.get("baselines") or {},
        metrics=metrics,
        teacher=meta.get("teacher") or {},
        notes=list(meta.get("notes") or []),
        replicates=int(meta.get("replicates") or 2000),
    )
    rows = rows_from_csv(prefix.with_suffix(".csv"), info.metrics)
    examples_path = Path(f"{prefix}-examples.csv.gz")
    examples = read_examples(examples_path) if examples_path.is_file() else {}
    add_comparisons(
        rows, info.baseline_of, info.metrics, TASKS[task].example_metrics, examples, info.replicates
    )
    return write_report(prefix, info, rows, examples)
