"""The seeds × examples interval of a comparison: a paired two-level bootstrap.

A study's difference ``Δ = mean_s [m(variant, s) − m(baseline, s)]`` has two sources of noise: the seeds
(initialisation, data order, dropout: the training) and the evaluation examples (a finite sample of the
data the students will meet). The bootstrap resamples both, paired:

1. draw the seeds with replacement;
2. draw the evaluation examples with replacement — once per example set and replicate, so that seeds scored
   on the same examples (one held-out split) keep sharing them, and seeds scored on their own fold (cross-
   evaluation) get their own draw — and weigh every run of a drawn seed with those same examples, the
   baseline's and the variant's alike;
3. recompute each run's metric from the weighted per-example columns and average the differences.

The percentile interval of the replicates is the interval; the two-sided p-value is
``min(1, 2 · min(1 + #{Δ* ≤ 0}, 1 + #{Δ* ≥ 0}) / (R + 1))``. A metric is any function of sums of
per-example columns (accuracy, macro-F1 from per-class counts, perplexity from summed NLL and positions), so
a replicate is a matrix product of multinomial example weights with the columns.

The design's power comes from its variance components: the seed (training) variance ``σ²_seed`` of a run's
difference, net of the example noise it carries, and the variance ``V_ex`` of ``Δ`` from the example sample;
``SE² = σ²_seed / S + V_ex`` with Welch–Satterthwaite degrees of freedom.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from distillkit.study.stats import ALPHA, POWER, detectable_difference, satterthwaite_df

Columns = Mapping[str, np.ndarray]
"""Per-example additive columns: name -> ``[n]`` float64 (a metric is a function of their sums)."""
MetricOfSums = Callable[[Mapping[str, np.ndarray]], np.ndarray]
"""Column name -> ``[R]`` (weighted) sums, to the metric ``[R]``."""

CHUNK = 256
"""Replicates whose example weights are held in memory at once."""


@dataclass(frozen=True)
class SeedPair:
    """One seed's runs of the baseline and the variant, scored on the same examples.

    Attributes:
        seed: The training seed.
        examples: Names the example set; seeds naming the same set were scored on the same examples, in
            the same order.
        baseline: The baseline run's per-example columns, each ``[n]``.
        variant: The variant run's, on the same examples in the same order.

    """

    seed: int
    examples: str
    baseline: Columns
    variant: Columns

    @property
    def size(self) -> int:
        """The number of examples ``n``."""
        return len(next(iter(self.baseline.values())))


@dataclass(frozen=True)
class BootstrapDifference:
    """A variant minus its baseline over seeds and examples.

    Attributes:
        mean: ``mean_s [m(variant, s) − m(baseline, s)]`` on the examples as scored.
        low: Lower end of the percentile interval.
        high: Upper end.
        p_value: Two-sided bootstrap p-value of a zero difference.
        confidence: The interval's level.
        replicates: Bootstrap replicates ``R``.
        seeds: The paired seeds ``S``.
        examples: Examples per seed (the smallest set).
        seed_variance: ``σ²_seed``: the variance of one seed's difference due to training (example noise
            netted out).
        example_variance: ``V_ex``: the variance of ``Δ`` due to the example sample.

    """

    mean: float
    low: float
    high: float
    p_value: float
    confidence: float
    replicates: int
    seeds: int
    examples: int
    seed_variance: float
    example_variance: float

    @property
    def standard_error(self) -> float:
        """``√(σ²_seed / S + V_ex)``."""
        return math.sqrt(self.seed_variance / self.seeds + self.example_variance)

    @property
    def df(self) -> float:
        """Welch–Satterthwaite degrees of freedom (seed part ``S − 1``, example part ``n − 1``)."""
        return satterthwaite_df(
            [(self.seed_variance / self.seeds, self.seeds - 1), (self.example_variance, self.examples - 1)]
        )

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or below zero."""
        return self.low > 0.0 or self.high < 0.0

    def detectable(self, power: float = POWER, alpha: float = ALPHA) -> float:
        """The smallest difference this design (seeds and examples) detects with ``power`` at ``alpha``."""
        if self.seeds < 2:
            return math.nan
        return detectable_difference(self.standard_error, self.df, power, alpha)


def _metric(value: MetricOfSums, columns: Columns, weights: np.ndarray) -> np.ndarray:
    """The metric under each row of example weights ``[R, n]``: ``[R]``."""
    return np.asarray(value({name: weights @ column for name, column in columns.items()}), dtype=np.float64)


def two_level_bootstrap(
    pairs: Sequence[SeedPair],
    value: MetricOfSums,
    replicates: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapDifference:
    """The paired two-level bootstrap of ``mean_s [m(variant, s) − m(baseline, s)]``.

    Args:
        pairs: One entry per seed both variants ran (at least two).
        value: The metric as a function of column sums (vectorised over replicates).
        replicates: Bootstrap replicates ``R``.
        confidence: Level of the percentile interval.
        seed: Seed of the resampling (the result is a deterministic function of the data and this seed).

    Returns:
        The difference, its interval and p-value, and the variance components of the design.

    Raises:
        ValueError: With fewer than two seeds, or seeds of one example set with different example counts.

    """
    if len(pairs) < 2:
        raise ValueError("the two-level bootstrap needs at least two paired seeds")
    sizes: dict[str, int] = {}
    for pair in pairs:
        if sizes.setdefault(pair.examples, pair.size) != pair.size:
            raise ValueError(
                f"the runs scored on example set '{pair.examples}' have different example counts"
            )
    count = len(pairs)
    point = np.array([_paired_metrics(value, pair, np.ones((1, pair.size)))[0] for pair in pairs])
    rng = np.random.default_rng(seed)
    drawn_seeds = rng.integers(0, count, size=(replicates, count))
    differences = np.empty((count, replicates))  # per seed, under each replicate's example weights
    for start in range(0, replicates, CHUNK):
        rows = min(CHUNK, replicates - start)
        weights = {
            name: rng.multinomial(n, np.full(n, 1.0 / n), size=rows).astype(np.float64)
            for name, n in sizes.items()
        }
        for s, pair in enumerate(pairs):
            differences[s, start : start + rows] = _paired_metrics(value, pair, weights[pair.examples])
    resampled = differences[drawn_seeds, np.arange(replicates)[:, None]].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    below, above = int((resampled <= 0).sum()), int((resampled >= 0).sum())
    p_value = min(1.0, 2.0 * min(below + 1, above + 1) / (replicates + 1))
    example_variance = float(differences.mean(axis=0).var(ddof=1))
    per_seed_example_variance = float(differences.var(axis=1, ddof=1).mean())
    shares = Counter(pair.examples for pair in pairs)
    distinct = 1.0 - sum(k * k for k in shares.values()) / count**2  # 0: one set for all; 1 − 1/S: one each
    carried = per_seed_example_variance * distinct * count / (count - 1)
    seed_variance = max(0.0, float(point.var(ddof=1)) - carried)
    return BootstrapDifference(
        mean=float(point.mean()),
        low=float(low),
        high=float(high),
        p_value=p_value,
        confidence=confidence,
        replicates=replicates,
        seeds=count,
        examples=min(sizes.values()),
        seed_variance=seed_variance,
        example_variance=example_variance,
    )


def _paired_metrics(value: MetricOfSums, pair: SeedPair, weights: np.ndarray) -> np.ndarray:
    """``m(variant) − m(baseline)`` of one seed under each row of example weights ``[R, n]``."""
    return _metric(value, pair.variant, weights) - _metric(value, pair.baseline, weights)
