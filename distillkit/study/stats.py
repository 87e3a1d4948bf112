"""Comparisons of study variants over seeds: the paired t interval, Holm's correction, the design's power.

- :func:`paired_difference`: the mean of ``variant − baseline`` over the seeds both ran, with a paired t
  interval and p-value (the seeds-only line of a comparison);
- :func:`holm`: Holm's step-down adjustment of the p-values of the variants compared with their baselines;
- :func:`t_test_power` / :func:`detectable_difference`: the power of a two-sided t test and the smallest
  difference a design detects at 80% power (noncentral t; the normal distribution for infinite degrees of
  freedom);
- :func:`spread`: one variant's standard deviation and range across seeds.

The seeds × examples line of a comparison is :mod:`distillkit.study.bootstrap`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import optimize
from scipy import stats as scipy_stats

ALPHA = 0.05
"""The two-sided level of every test and detectable difference of a study."""
POWER = 0.8
"""The power at which a study reports the smallest detectable difference."""


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
        p_value: Two-sided p-value of the paired t test of a zero mean difference (NaN with fewer than two
            seeds).

    """

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    low: float
    high: float
    confidence: float
    p_value: float = math.nan

    @property
    def n(self) -> int:
        """The number of paired seeds."""
        return len(self.seeds)

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or below zero (False without an interval)."""
        return self.low > 0.0 or self.high < 0.0

    @property
    def standard_error(self) -> float:
        """``sd(d) / √n`` of the per-seed differences (NaN with fewer than two seeds)."""
        if self.n < 2:
            return math.nan
        return statistics.stdev(self.differences) / math.sqrt(self.n)

    def detectable(self, power: float = POWER, alpha: float = ALPHA) -> float:
        """The smallest difference this many seeds detect with ``power``, from the seeds' own spread.

        The paired t test over ``n`` seeds with the observed ``sd(d)``: see :func:`detectable_difference`.
        NaN with fewer than two seeds.
        """
        if self.n < 2:
            return math.nan
        return detectable_difference(self.standard_error, self.n - 1, power, alpha)


def paired_difference(
    baseline: dict[int, float], variant: dict[int, float], confidence: float = 0.95
) -> PairedDifference:
    """Mean of ``variant - baseline`` over the seeds both ran, with a paired t interval and p-value.

    The interval is ``mean ± t_{(1+c)/2, n-1} · sd / √n`` over the per-seed differences (Student's t with
    ``n - 1`` degrees of freedom): pairing by seed removes what the two runs of a seed share (initialisation,
    data order), so the interval is about the objectives, not the seeds. The p-value is that of
    ``t = mean / (sd / √n)``, two-sided.

    Args:
        baseline: Seed -> the baseline's metric.
        variant: Seed -> the variant's metric.
        confidence: The interval's level.

    Returns:
        The paired difference; ``low``/``high``/``p_value`` are NaN with fewer than two common seeds.

    """
    seeds = tuple(sorted(set(baseline) & set(variant)))
    diffs = tuple(variant[s] - baseline[s] for s in seeds)
    nan = math.nan
    if not diffs:
        return PairedDifference(seeds, diffs, nan, nan, nan, confidence)
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(seeds, diffs, mean, nan, nan, confidence)
    error = statistics.stdev(diffs) / math.sqrt(len(diffs))
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, len(diffs) - 1)) * error
    if error > 0:
        p_value = 2.0 * float(scipy_stats.t.sf(abs(mean) / error, len(diffs) - 1))
    else:  # every seed gave the same difference
        p_value = 0.0 if mean != 0 else 1.0
    return PairedDifference(seeds, diffs, mean, mean - half, mean + half, confidence, p_value)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    With the ``m`` valid p-values sorted ascending, ``p_(1) ≤ … ≤ p_(m)``, the adjusted value of ``p_(k)`` is
    ``max_{j ≤ k} min(1, (m − j + 1) · p_(j))``. A hypothesis is rejected at level α when its adjusted value
    is at most α; the family-wise error rate is then at most α whatever the dependence between the tests.

    Args:
        p_values: One p-value per comparison; NaN entries (no test) are left NaN and not counted in ``m``.

    Returns:
        The adjusted p-values.

    """
    valid = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(valid):
        running = max(running, min(1.0, (len(valid) - rank) * p))
        adjusted[i] = running
    return adjusted


def t_test_power(difference: float, standard_error: float, df: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided t test of a zero mean when the true mean difference is ``difference``.

    ``P(|T| > t_{1−α/2, df})`` with ``T`` noncentral t with ``df`` degrees of freedom and noncentrality
    ``difference / standard_error``; for ``df = inf``, ``Φ(δ/SE − z_{1−α/2}) + Φ(−δ/SE − z_{1−α/2})``.

    Args:
        difference: The true difference ``δ``.
        standard_error: The standard error of the estimated difference.
        df: Degrees of freedom (``math.inf``: known variance, normal test).
        alpha: The two-sided level.

    Returns:
        The probability that the test rejects ``δ = 0``.

    """
    shift = difference / standard_error
    if math.isinf(df):
        z = float(scipy_stats.norm.ppf(1 - alpha / 2))
        return float(scipy_stats.norm.cdf(shift - z) + scipy_stats.norm.cdf(-shift - z))
    critical = float(scipy_stats.t.ppf(1 - alpha / 2, df))
    far = float(scipy_stats.nct.cdf(-critical, df, shift))  # scipy gives NaN where it underflows
    return float(scipy_stats.nct.sf(critical, df, shift)) + (far if math.isfinite(far) else 0.0)


def detectable_difference(
    standard_error: float, df: float, power: float = POWER, alpha: float = ALPHA
) -> float:
    """The smallest difference ``δ > 0`` the two-sided t test detects with probability ``power``.

    Solves ``t_test_power(δ, standard_error, df, alpha) = power``. With ``df = inf`` it is close to
    ``(z_{1−α/2} + z_{power}) · SE`` (2.80 · SE at α = 0.05 and 80%); with few seeds the t quantiles make it
    larger (3.72 · SE with 5 seeds, before the noncentral correction).

    Args:
        standard_error: Standard error of the estimated difference (0 gives 0; NaN gives NaN).
        df: Degrees of freedom of the test (``math.inf`` for a normal test).
        power: The wanted power.
        alpha: The two-sided level.

    Returns:
        The detectable difference, in the metric's units.

    """
    if math.isnan(standard_error) or math.isnan(df) or df <= 0:
        return math.nan
    if standard_error == 0:
        return 0.0
    upper = 10.0 * standard_error
    while t_test_power(upper, standard_error, df, alpha) < power:
        upper *= 2
    return float(
        optimize.brentq(
            lambda d: t_test_power(d, standard_error, df, alpha) - power, 0.0, upper, xtol=1e-12 * upper
        )
    )


def satterthwaite_df(parts: Sequence[tuple[float, float]]) -> float:
    """Welch–Satterthwaite degrees of freedom of a sum of variance estimates.

    Args:
        parts: ``(variance, df)`` of each independent part (``df`` may be ``math.inf``).

    Returns:
        ``(Σ v)² / Σ (v² / df)``; ``math.inf`` when every part with variance has infinite df, NaN when the
        sum is zero.

    """
    total = sum(v for v, _ in parts)
    if total <= 0:
        return math.nan
    denominator = sum(v * v / df for v, df in parts if v > 0 and not math.isinf(df))
    return math.inf if denominator == 0 else total * total / denominator


def spread(values: list[float]) -> tuple[float, float]:
    """Standard deviation (n-1) and range (max - min) of one variant's metric across seeds."""
    if len(values) < 2:
        return (0.0, 0.0) if values else (math.nan, math.nan)
    return statistics.stdev(values), max(values) - min(values)
