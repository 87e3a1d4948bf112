"""Paired comparisons of study variants: the mean difference by seed with a paired t interval; spread."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats as scipy_stats


@dataclass(frozen=True)
class PairedDifference:
    """A variant minus the baseline, paired by seed.

    Attributes:
        seeds: The seeds both ran, in order.
        differences: ``variant - baseline`` per seed.
        mean: Mean difference.
        low: Lower end of the two-sided confidence interval (NaN with fewer than two seeds).
        high: Upper end of the interval.
        confidence: The interval's level (0.95).

    """

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    low: float
    high: float
    confidence: float

    @property
    def n(self) -> int:
        """The number of paired seeds."""
        return len(self.seeds)

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or below zero (False without an interval)."""
        return self.low > 0.0 or self.high < 0.0


def paired_difference(
    baseline: dict[int, float], variant: dict[int, float], confidence: float = 0.95
) -> PairedDifference:
    """Mean of ``variant - baseline`` over the seeds both ran, with a paired t interval.

    The interval is ``mean ± t_{(1+c)/2, n-1} · sd / √n`` over the per-seed differences (Student's t with
    ``n - 1`` degrees of freedom): pairing by seed removes what the two runs of a seed share (initialisation,
    data order), so the interval is about the objectives, not the seeds.

    Args:
        baseline: Seed -> the baseline's metric.
        variant: Seed -> the variant's metric.
        confidence: The interval's level.

    Returns:
        The paired difference; ``low``/``high`` are NaN with fewer than two common seeds.

    """
    seeds = tuple(sorted(set(baseline) & set(variant)))
    diffs = tuple(variant[s] - baseline[s] for s in seeds)
    if not diffs:
        nan = float("nan")
        return PairedDifference(seeds, diffs, nan, nan, nan, confidence)
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(seeds, diffs, mean, float("nan"), float("nan"), confidence)
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, len(diffs) - 1)) * statistics.stdev(diffs)
    half /= math.sqrt(len(diffs))
    return PairedDifference(seeds, diffs, mean, mean - half, mean + half, confidence)


def spread(values: list[float]) -> tuple[float, float]:
    """Standard deviation (n-1) and range (max - min) of one variant's metric across seeds."""
    if len(values) < 2:
        return (0.0, 0.0) if values else (float("nan"), float("nan"))
    return statistics.stdev(values), max(values) - min(values)
