"""The large-n OT assignment (flowmatch/ot_large.py) against exact solvers: scipy's linear_sum_assignment, POT's
network simplex (when installed) and brute force over all permutations; the certified gap is a true bound."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from flowmatch.ot_large import (
    OTSolver,
    assignment_cost,
    auction_assignment,
    exact_assignment,
    exact_permutation,
    ot_permutation,
)


def _points(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian sources and structured targets in [-1, 1] (smooth random 'images' of d = 3 s^2 pixels, or a
    uniform cloud when d is not of that form)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g)
    side = int(round((d / 3) ** 0.5))
    if 3 * side * side == d and side >= 4:
        low = torch.randn(n, 3, 4, 4, generator=g)
        x1 = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear").tanh().reshape(n, d)
    else:
        x1 = torch.rand(n, d, generator=g) * 2 - 1
    return x0, x1


def _is_permutation(perm: torch.Tensor, n: int) -> bool:
    return sorted(perm.tolist()) == list(range(n))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_auction_matches_brute_force(n):
    x0, x1 = _points(n, 3, seed=n)
    best = min(
        assignment_cost(x0, x1, torch.tensor(p)) for p in itertools.permutations(range(n))
    )  # independent truth: every permutation
    res = auction_assignment(x0, x1, device="cpu")
    assert _is_permutation(res.perm, n)
    assert res.cost == pytest.approx(best, rel=1e-9, abs=1e-9)
    assert res.lower_bound <= best + 1e-9


@pytest.mark.parametrize("n,d,dtype", [(200, 64, torch.float64), (300, 192, torch.float64), (300, 192, torch.float32)])
def test_auction_against_scipy_with_certified_gap(n, d, dtype):
    """Optimality gap measured against scipy: the auction's cost minus the exact optimum is >= 0, within the
    certified gap (cost - dual lower bound) and within rel_gap of the optimum; the dual bound is below it."""
    x0, x1 = _points(n, d, seed=1)
    exact = exact_assignment(x0, x1)
    res = auction_assignment(x0, x1, rel_gap=1e-6, device="cpu", dtype=dtype)
    assert _is_permutation(res.perm, n)
    excess = res.cost - exact.cost
    tol = 1e-9 * exact.cost  # float64 summation
    assert -tol <= excess <= res.gap + tol
    assert res.lower_bound <= exact.cost + tol
    assert excess / exact.cost <= 1e-6 + 1e-9
    assert res.rel_gap < 1e-5  # the certificate itself is tight (measured ~1e-7 .. 1e-6)
    if dtype == torch.float64:  # float64 benefits: the optimum itself at these sizes
        assert (res.perm == exact.perm).float().mean() > 0.99


def test_auction_against_pot():
    ot = pytest.importorskip("ot")
    x0, x1 = _points(150, 48, seed=2)
    cost = torch.cdist(x0.double(), x1.double()).pow(2).numpy()
    n = len(x0)
    plan = ot.emd(np.full(n, 1.0 / n), np.full(n, 1.0 / n), cost)
    pot_cost = float((plan * cost).sum() * n)  # a permutation matrix / n at the optimum
    res = auction_assignment(x0, x1, device="cpu")
    assert res.cost == pytest.approx(pot_cost, rel=1e-6)


def test_exact_permutation_is_scipy_and_on_device_of_x0():
    x0, x1 = _points(40, 6, seed=3)
    perm = exact_permutation(x0, x1)
    assert _is_permutation(perm, 40) and perm.device == x0.device
    res = exact_assignment(x0, x1)
    assert res.gap == 0 and torch.equal(res.perm, perm)


def test_auto_switches_at_the_threshold_and_options_are_checked():
    x0, x1 = _points(30, 4, seed=4)
    assert ot_permutation(x0, x1, "auto", exact_max_n=30).method == "exact"
    assert ot_permutation(x0, x1, "auto", exact_max_n=29, device="cpu").method == "auction"
    with pytest.raises(ValueError, match="coupling.solver"):
        OTSolver("hungarian")
    with pytest.raises(ValueError, match="coupling.rel_gap"):
        OTSolver("auction", rel_gap=0)
    with pytest.raises(ValueError, match="coupling.exact_max_n"):
        OTSolver("auto", exact_max_n=0)
    with pytest.raises(ValueError, match="one shape"):
        auction_assignment(x0, x1[:5])


def test_images_shape_and_ties():
    """(n, C, H, W) inputs are flattened; identical targets (ties) still give a permutation of optimal cost."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(12, 1, 2, 2, generator=g)
    x1 = torch.cat([torch.zeros(6, 1, 2, 2), torch.ones(6, 1, 2, 2)])
    res = auction_assignment(x0, x1, device="cpu")
    assert _is_permutation(res.perm, 12)
    assert res.cost == pytest.approx(exact_assignment(x0, x1).cost, rel=1e-9)
