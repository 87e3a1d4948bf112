"""The study's statistics against hand computations and closed forms: paired t, Holm, power, bootstrap."""

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from distillkit.study.bootstrap import SeedPair, two_level_bootstrap
from distillkit.study.stats import (
    detectable_difference,
    holm,
    paired_difference,
    satterthwaite_df,
    t_test_power,
)


def _phi(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# -- the paired t test ---------------------------------------------------------------------------------------
def _differences_with_t(t, n):
    """Per-seed differences whose paired t statistic is exactly ``t``: mean t·SE, spread -k..k."""
    spread = [i - (n - 1) / 2 for i in range(n)]
    sd = math.sqrt(sum(x * x for x in spread) / (n - 1))
    mean = t * sd / math.sqrt(n)
    return [mean + x for x in spread]


@pytest.mark.parametrize(
    ("t", "n", "p"),
    [
        (1.0, 2, 0.5),  # df 1 (Cauchy): p = 1 − 2·atan(t)/π
        (3.0, 2, 1 - 2 * math.atan(3.0) / math.pi),
        (2.0, 3, 1 - 2.0 / math.sqrt(2 + 4.0)),  # df 2: p = 1 − t/√(2 + t²)
        (2.7764451051977934, 5, 0.05),  # the t table: t(0.975, 4)
    ],
)
def test_paired_t_p_value_matches_closed_forms(t, n, p):
    diffs = _differences_with_t(t, n)
    result = paired_difference(dict.fromkeys(range(n), 0.0), dict(enumerate(diffs)))
    assert result.p_value == pytest.approx(p, abs=1e-9)
    negative = paired_difference(dict.fromkeys(range(n), 0.0), {s: -d for s, d in enumerate(diffs)})
    assert negative.p_value == pytest.approx(p, abs=1e-9)


def test_paired_t_p_value_of_identical_differences():
    assert paired_difference({0: 0.5, 1: 0.6}, {0: 0.6, 1: 0.7}).p_value == 0.0
    assert paired_difference({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6}).p_value == 1.0
    assert math.isnan(paired_difference({0: 0.5}, {0: 0.6}).p_value)


# -- Holm ----------------------------------------------------------------------------------------------------
def test_holm_matches_a_hand_computation():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == [0.02]
    adjusted = holm([0.01, math.nan, 0.04])  # a comparison without a test is not counted
    assert (
        adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    )
    assert holm([]) == []


def test_holm_rejects_what_bonferroni_rejects_and_more():
    p = [0.011, 0.02, 0.03]  # 0.011·3 = 0.033; 0.02·2 = 0.04; 0.03·1 = 0.03, raised to 0.04
    assert all(a <= min(1.0, 3 * x) + 1e-15 for a, x in zip(holm(p), p, strict=True))
    assert holm(p) == pytest.approx([0.033, 0.04, 0.04])


# -- power ---------------------------------------------------------------------------------------------------
def test_power_of_a_normal_test_is_the_closed_form():
    z = 1.959963984540054
    for shift in (0.0, 1.0, 2.8, 4.0):
        expected = _phi(shift - z) + _phi(-shift - z)
        assert t_test_power(shift * 0.01, 0.01, math.inf) == pytest.approx(expected, abs=1e-12)
    # (z_0.975 + z_0.8) · SE, less a negligible far-tail share
    assert detectable_difference(1.0, math.inf) == pytest.approx(
        1.959963984540054 + 0.8416212335729143, abs=1e-4
    )
    assert detectable_difference(0.003, math.inf) == pytest.approx(
        0.003 * detectable_difference(1.0, math.inf)
    )
    assert detectable_difference(1.0, 1e7) == pytest.approx(detectable_difference(1.0, math.inf), abs=1e-4)


def test_detectable_difference_has_the_requested_power():
    for df in (1, 4, 9, 30):
        mde = detectable_difference(0.002, df)
        assert t_test_power(mde, 0.002, df) == pytest.approx(0.8, abs=1e-9)
        assert t_test_power(0.9 * mde, 0.002, df) < 0.8 < t_test_power(1.1 * mde, 0.002, df)
    # fewer degrees of freedom, larger detectable difference; 5 seeds: above (t_.975 + t_.8)·SE = 3.72·SE
    assert (
        detectable_difference(1.0, 4) > detectable_difference(1.0, 9) > detectable_difference(1.0, math.inf)
    )
    assert 3.72 < detectable_difference(1.0, 4) < 4.2
    assert detectable_difference(0.0, 4) == 0.0 and math.isnan(detectable_difference(math.nan, 4))


def test_power_of_the_paired_t_test_matches_a_simulation():
    rng = np.random.default_rng(0)
    n, sd, delta, trials = 5, 1.0, 1.5, 200_000
    diffs = rng.normal(delta, sd, size=(trials, n))
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(n))
    rejected = float((np.abs(t) > 2.7764451051977934).mean())
    assert t_test_power(delta, sd / math.sqrt(n), n - 1) == pytest.approx(rejected, abs=0.004)


def test_paired_difference_reports_the_detectable_difference_of_its_seeds():
    diff = paired_difference({0: 0.0, 1: 0.0, 2: 0.0}, {0: 0.01, 1: 0.02, 2: 0.03})
    assert diff.standard_error == pytest.approx(0.01 / math.sqrt(3))
    assert diff.detectable() == pytest.approx(detectable_difference(0.01 / math.sqrt(3), 2))


def test_satterthwaite_degrees_of_freedom():
    assert satterthwaite_df([(1.0, 4), (0.0, 100)]) == pytest.approx(4)
    assert satterthwaite_df([(1.0, 4), (1.0, 4)]) == pytest.approx(8)  # two equal parts: df add
    assert satterthwaite_df([(1.0, math.inf)]) == math.inf
    assert math.isnan(satterthwaite_df([(0.0, 4)]))


# -- the two-level bootstrap ---------------------------------------------------------------------------------
def _accuracy(sums):
    return sums["correct"] / sums["n"]


def _columns(correct):
    correct = np.asarray(correct, dtype=np.float64)
    return {"correct": correct, "n": np.ones_like(correct)}


def test_bootstrap_matches_the_enumerated_distribution():
    """Two seeds, two shared examples: the bootstrap distribution is small enough to enumerate by hand.

    Seed 0 gains on example 1, seed 1 on example 0. Example weights (2, 0), (1, 1), (0, 2) have probabilities
    1/4, 1/2, 1/4 (one draw per replicate, shared by the seeds); the two drawn seeds are each 0 or 1. Under
    (1, 1) every replicate is 0.5; under (2, 0) the drawn seeds 00, 01, 10, 11 give 0, .5, .5, 1, and under
    (0, 2) 1, .5, .5, 0. So P(0) = P(1) = 1/8 and P(0.5) = 3/4.
    """
    baseline = {0: [1, 0], 1: [0, 0]}
    variant = {0: [1, 1], 1: [1, 0]}
    enumerated = Counter()
    for seeds in itertools.product((0, 1), repeat=2):
        for weights, p in (((2, 0), 0.25), ((1, 1), 0.5), ((0, 2), 0.25)):
            w = np.array(weights, dtype=float)
            diffs = [(w @ np.array(variant[s]) - w @ np.array(baseline[s])) / 2 for s in seeds]
            enumerated[float(np.mean(diffs))] += 0.25 * p
    assert enumerated == pytest.approx({0.0: 0.125, 0.5: 0.75, 1.0: 0.125})
    pairs = [SeedPair(s, "eval", _columns(baseline[s]), _columns(variant[s])) for s in (0, 1)]
    result = two_level_bootstrap(pairs, _accuracy, replicates=40_000, seed=1)
    assert result.mean == pytest.approx(0.5)
    assert (result.low, result.high) == (0.0, 1.0)  # 12.5% of the mass at each end
    assert result.p_value == pytest.approx(2 * 0.125, abs=0.01)  # P(Δ* ≤ 0) = 1/8, doubled


def test_bootstrap_of_identical_runs_is_zero():
    pairs = [SeedPair(s, "eval", _columns([1, 0, 1, 1]), _columns([1, 0, 1, 1])) for s in range(3)]
    result = two_level_bootstrap(pairs, _accuracy, replicates=500)
    assert (result.mean, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert result.seed_variance == 0.0 and result.example_variance == 0.0


def test_bootstrap_example_variance_of_a_shared_set_is_the_variance_of_the_mean():
    """Seeds that agree exactly: no seed variance; the example part is the plug-in variance of a mean."""
    rng = np.random.default_rng(3)
    n = 400
    base = (rng.random(n) < 0.8).astype(float)
    var = np.where(rng.random(n) < 0.1, 1 - base, base)  # the variant flips 10% of the answers
    pairs = [SeedPair(s, "eval", _columns(base), _columns(var)) for s in range(4)]
    result = two_level_bootstrap(pairs, _accuracy, replicates=4000)
    d = var - base
    assert result.mean == pytest.approx(d.mean())
    assert result.seed_variance == 0.0
    assert result.example_variance == pytest.approx(d.var() / n, rel=0.1)
    assert result.standard_error == pytest.approx(math.sqrt(d.var() / n), rel=0.06)
    assert result.df > 100  # the example part dominates: many degrees of freedom


def test_bootstrap_with_one_fold_per_seed_does_not_count_example_noise_twice():
    """Each seed on its own examples, no training noise: the seed variance is example noise, netted out."""
    rng = np.random.default_rng(5)
    n, seeds = 300, 6
    pairs = []
    for s in range(seeds):
        base = (rng.random(n) < 0.7).astype(float)
        var = np.where(rng.random(n) < 0.2, 1 - base, base)
        pairs.append(SeedPair(s, f"fold-{s}", _columns(base), _columns(var)))
    result = two_level_bootstrap(pairs, _accuracy, replicates=3000)
    point = np.array([(p.variant["correct"] - p.baseline["correct"]).mean() for p in pairs])
    # SE² = σ²_seed / S + V_ex ≈ s²_d / S (what the per-seed differences vary by, example noise included)
    expected = max(point.var(ddof=1) / seeds, result.example_variance)
    assert result.standard_error**2 == pytest.approx(expected, rel=0.1)
    assert result.seeds == seeds and result.examples == n


def test_bootstrap_is_deterministic_and_checks_its_input():
    pairs = [SeedPair(s, "eval", _columns([1, 0, s % 2]), _columns([1, 1, 0])) for s in range(3)]
    assert two_level_bootstrap(pairs, _accuracy, replicates=300, seed=7) == two_level_bootstrap(
        pairs, _accuracy, replicates=300, seed=7
    )
    with pytest.raises(ValueError, match="at least two"):
        two_level_bootstrap(pairs[:1], _accuracy)
    odd = [*pairs[:2], SeedPair(9, "eval", _columns([1, 0]), _columns([1, 1]))]
    with pytest.raises(ValueError, match="different example counts"):
        two_level_bootstrap(odd, _accuracy)
