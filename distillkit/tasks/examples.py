"""Per-example evaluation output, and each metric as a function of sums over examples.

``Task.evaluate`` called with ``EvalContext(per_example=True)`` adds ``metrics[PER_EXAMPLE]``:
``{set: {column: [one value per example]}}`` — ``set`` is ``eval`` for the held-out split (``probe`` for a
representation task's linear probe, added by its report), and every set has an ``example_id`` column (the
example's row in its split). The columns per task:

- ``sequence_classification``: ``label``, ``pred`` (argmax class), ``nll`` (cross-entropy, nats);
- ``causal_lm`` / ``masked_lm``: per sequence, ``nll`` (summed over its labelled positions, nats),
  ``positions``, ``agree`` (positions where the argmax equals the teacher's; with a teacher), ``correct``
  (positions where it equals the label; ``masked_lm``);
- ``representation``: ``cosine`` (student–teacher sentence-embedding cosine); probe set: ``label``, ``pred``.

Every metric a task reports is a function of *sums* of per-example columns (:class:`ExampleMetric`), so a
study recomputes it exactly from the stored predictions under any reweighting of the examples (its
bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

PER_EXAMPLE = "per_example"
"""The key of the per-example columns in the metrics of ``evaluate`` (and in a task's report)."""

Stored = Mapping[str, np.ndarray]
"""One example set as stored: column -> ``[n]`` values."""
Sums = Mapping[str, np.ndarray]
"""Additive column -> its (weighted) sums, ``[R]`` or scalar."""


@dataclass(frozen=True)
class ExampleMetric:
    """How a metric is recomputed from per-example columns.

    Attributes:
        source: The example set it is scored on (``eval`` or ``probe``).
        columns: Stored columns -> additive columns ``[n]`` (float64) whose sums determine the metric.
        value: Sums of the additive columns (any shape, e.g. ``[R]`` for ``R`` weightings) -> the metric.

    """

    source: str
    columns: Callable[[Stored], dict[str, np.ndarray]]
    value: Callable[[Sums], np.ndarray]

    def of(self, stored: Stored) -> float:
        """The metric over all stored examples, each counted once."""
        return float(self.value({k: np.sum(v) for k, v in self.columns(stored).items()}))


def _float(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def mean_of(column: str, source: str = "eval") -> ExampleMetric:
    """The mean of a per-example column (``correct`` for accuracy, ``nll`` for a mean loss, ``cosine``)."""
    return ExampleMetric(
        source,
        lambda s: {column: _float(s[column]), "n": np.ones(len(s[column]))},
        lambda sums: sums[column] / sums["n"],
    )


def ratio_of(
    numerator: str,
    denominator: str,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    source: str = "eval",
) -> ExampleMetric:
    """``transform(Σ numerator / Σ denominator)`` (per-position means of per-sequence sums)."""
    return ExampleMetric(
        source,
        lambda s: {numerator: _float(s[numerator]), denominator: _float(s[denominator])},
        lambda sums: (transform or (lambda x: x))(sums[numerator] / np.maximum(sums[denominator], 1)),
    )


def capped_exp(loss: np.ndarray) -> np.ndarray:
    """``exp(min(loss, 50))``: perplexity, finite as the tasks report it."""
    return np.exp(np.minimum(loss, 50.0))


def accuracy_of_predictions(source: str = "eval") -> ExampleMetric:
    """The fraction of examples whose ``pred`` equals ``label``."""
    return ExampleMetric(
        source,
        lambda s: {
            "correct": _float(np.asarray(s["pred"]) == np.asarray(s["label"])),
            "n": np.ones(len(s["label"])),
        },
        lambda sums: sums["correct"] / sums["n"],
    )


def _confusion_columns(stored: Stored) -> dict[str, np.ndarray]:
    label, pred = np.asarray(stored["label"], dtype=np.int64), np.asarray(stored["pred"], dtype=np.int64)
    classes = int(max(label.max(initial=0), pred.max(initial=0))) + 1
    columns = {}
    for c in range(classes):
        columns[f"tp{c}"] = _float((pred == c) & (label == c))
        columns[f"fp{c}"] = _float((pred == c) & (label != c))
        columns[f"fn{c}"] = _float((pred != c) & (label == c))
    return columns


def _macro_f1(sums: Sums) -> np.ndarray:
    classes = sum(1 for key in sums if key.startswith("tp"))
    total, present = 0.0, 0.0
    for c in range(classes):
        tp, fp, fn = (np.asarray(sums[f"{k}{c}"], dtype=np.float64) for k in ("tp", "fp", "fn"))
        counted = (tp + fp + fn) > 0
        total = total + np.where(counted, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-300), 0.0)
        present = present + counted
    return np.where(present > 0, total / np.maximum(present, 1), 0.0)


def macro_f1(source: str = "eval") -> ExampleMetric:
    """Macro-averaged F1 over the classes that occur in labels or predictions (per-class tp, fp, fn sums)."""
    return ExampleMetric(source, _confusion_columns, _macro_f1)


def to_lists(columns: Mapping[str, object]) -> dict[str, list]:
    """Columns of tensors or arrays as JSON-able lists (floats rounded to 9 significant digits)."""
    out = {}
    for name, values in columns.items():
        array = np.asarray(values.cpu() if hasattr(values, "cpu") else values)
        if np.issubdtype(array.dtype, np.floating):
            out[name] = [float(f"{v:.9g}") if math.isfinite(v) else None for v in array.tolist()]
        else:
            out[name] = [int(v) for v in array.tolist()]
    return out
