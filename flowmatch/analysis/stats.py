"""Small statistics for the paper's figures: mean and spread over seeds, and a one-sided paired test.

Kept apart from the figure scripts so they have unit tests (``tests/test_paper_stats.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = ["Spread", "mean_spread", "OneSidedTest", "one_sided_paired_test"]


@dataclass(frozen=True)
class Spread:
    """Summary of ``n`` values: mean, sample standard deviation (ddof = 1; 0 for n = 1), min, max, and the
    standard error std / sqrt(n)."""

    n: int
    mean: float
    std: float
    min: float
    max: float
    sem: float

    def as_dict(self, prefix: str = "") -> dict:
        """The fields as ``{prefix + name: value}``."""
        return {prefix + k: v for k, v in asdict(self).items()}


def mean_spread(values: Sequence[float]) -> Spread:
    """Mean +- spread of ``values`` (NaNs are an error: a diverged seed must be seen, not averaged away)."""
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("mean_spread needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_spread got non-finite values: {x[~np.isfinite(x)].tolist()}")
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return Spread(int(x.size), float(x.mean()), std, float(x.min()), float(x.max()), std / np.sqrt(x.size))


@dataclass(frozen=True)
class OneSidedTest:
    """H0: a and b have the same mean; H1: mean(a) < mean(b), from n paired values (a_i, b_i).

    ``t``, ``p_t``: paired t-test (t = mean(d) / (sd(d) / sqrt(n)), d = a - b, p = F_{t, n-1}(t));
    ``p_wilcoxon``: Wilcoxon signed-rank test of d, one-sided (exact for small n without ties);
    ``frac_less``: fraction of pairs with a_i < b_i."""

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    t: float
    p_t: float
    p_wilcoxon: float
    frac_less: float

    def as_dict(self, prefix: str = "") -> dict:
        """The fields as ``{prefix + name: value}``."""
        return {prefix + k: v for k, v in asdict(self).items()}


def one_sided_paired_test(a: Sequence[float], b: Sequence[float]) -> OneSidedTest:
    """Is ``a`` smaller than ``b``? Paired one-sided t-test and Wilcoxon signed-rank test (H1: a < b).

    Pairs share their randomness (the same seed's probe), so the difference d = a - b is tested. When every
    d_i is 0 there is no evidence either way: t = 0, both p-values are 1."""
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"one_sided_paired_test needs two equal-length samples of >= 2 values, got {a.size}, {b.size}")
    d = a - b
    common = dict(
        n=int(a.size),
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        mean_diff=float(d.mean()),
        frac_less=float(np.mean(d < 0)),
    )
    if np.all(d == 0):
        return OneSidedTest(t=0.0, p_t=1.0, p_wilcoxon=1.0, **common)
    sd = d.std(ddof=1)
    if sd == 0:  # every pair differs by the same amount: the sign decides
        t, p_t = (-np.inf, 0.0) if d[0] < 0 else (np.inf, 1.0)
    else:
        res = stats.ttest_rel(a, b, alternative="less")
        t, p_t = float(res.statistic), float(res.pvalue)
    p_w = float(stats.wilcoxon(d, alternative="less", zero_method="wilcox").pvalue)
    return OneSidedTest(t=float(t), p_t=float(p_t), p_wilcoxon=p_w, **common)
