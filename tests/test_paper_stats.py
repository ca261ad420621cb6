"""The statistics of the paper figures against independent truth: numpy by hand, the t distribution's CDF,
and an exhaustive sign-flip enumeration for the Wilcoxon signed-rank test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from flowmatch.analysis.stats import mean_spread, one_sided_paired_test


def test_mean_spread_by_hand():
    x = [1.0, 2.0, 4.0, 7.0]
    s = mean_spread(x)
    mean = sum(x) / 4
    var = sum((v - mean) ** 2 for v in x) / 3
    assert s.n == 4 and s.mean == pytest.approx(mean) and s.std == pytest.approx(math.sqrt(var))
    assert (s.min, s.max) == (1.0, 7.0) and s.sem == pytest.approx(math.sqrt(var / 4))
    assert mean_spread([3.0]).std == 0.0
    assert set(s.as_dict("x_")) == {"x_n", "x_mean", "x_std", "x_min", "x_max", "x_sem"}


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_mean_spread_refuses(bad):
    with pytest.raises(ValueError):
        mean_spread(bad)


def test_t_test_matches_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.0, 1.0, 20), rng.normal(0.3, 1.0, 20)
    r = one_sided_paired_test(a, b)
    d = a - b
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    assert r.t == pytest.approx(t) and r.p_t == pytest.approx(stats.t.cdf(t, len(d) - 1))
    assert r.mean_diff == pytest.approx(d.mean()) and r.frac_less == pytest.approx(np.mean(d < 0))


def _wilcoxon_by_enumeration(d: np.ndarray) -> float:
    """P(W+ <= w+ observed) over all 2^n sign flips of |d| (no ties, no zeros): the exact one-sided p-value."""
    ranks = stats.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    count = sum(
        ranks[np.array(signs, bool)].sum() <= observed + 1e-9 for signs in itertools.product([0, 1], repeat=len(d))
    )
    return count / 2 ** len(d)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_wilcoxon_matches_enumeration(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.0, 1.0, 10), rng.normal(0.5, 1.0, 10)
    assert one_sided_paired_test(a, b).p_wilcoxon == pytest.approx(_wilcoxon_by_enumeration(a - b))


def test_direction_and_degenerate_cases():
    a = np.arange(10.0)
    assert one_sided_paired_test(a, a + 1 + 0.01 * np.sin(a)).p_t < 1e-6  # clearly less
    assert one_sided_paired_test(a + 1 + 0.01 * np.sin(a), a).p_t > 1 - 1e-6  # clearly greater
    same = one_sided_paired_test(a, a)
    assert (same.p_t, same.p_wilcoxon, same.t) == (1.0, 1.0, 0.0)
    shift = one_sided_paired_test(a, a + 1)  # constant difference: zero spread, the sign decides
    assert shift.p_t == 0.0 and shift.frac_less == 1.0
    with pytest.raises(ValueError):
        one_sided_paired_test([1.0], [2.0])


def test_p_values_are_calibrated_under_the_null():
    """Under H0 the one-sided t-test rejects at 5% about 5% of the time (2000 repetitions, n = 20)."""
    rng = np.random.default_rng(7)
    p = [one_sided_paired_test(rng.normal(size=20), rng.normal(size=20)).p_t for _ in range(2000)]
    assert abs(np.mean(np.array(p) < 0.05) - 0.05) < 0.015
