import itertools

import pytest
import torch

from flowmatch.couplings import (
    FixedCoupling,
    IndependentCoupling,
    OTCoupling,
    RotatedCoupling,
    ShuffledOTCoupling,
    ot_assignment,
)
from flowmatch.direction import apply_direction
from flowmatch.distributions import Gaussian
from flowmatch.gaussian import rotation_matrix


def ends(dim=2, mean=5.0, cov=1.0):
    return Gaussian.standard(dim), Gaussian(torch.full((dim,), mean), cov)


@pytest.mark.parametrize("n", [3, 5, 6])
def test_ot_assignment_is_optimal_by_brute_force(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(5):
        x0, x1 = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
        perm = ot_assignment(x0, x1)
        assert sorted(perm.tolist()) == list(range(n))  # a permutation: no duplicates
        cost = ((x0 - x1[perm]) ** 2).sum()
        best = min(((x0 - x1[list(p)]) ** 2).sum() for p in itertools.permutations(range(n)))
        assert float(cost) <= float(best) + 1e-5


def test_ot_coupling_batches_are_permutations_of_fresh_draws():
    c = OTCoupling()
    c.setup(*ends())
    x0, x1 = c.sample(64, torch.Generator().manual_seed(0))
    indep = ((x0 - x1) ** 2).sum(1).mean()
    assert indep < 2 * 2 + 50 + 1  # E||x0 - x1||^2 under OT with mean 5 is ~ 50, independent ~ 54
    assert x0.shape == x1.shape == (64, 2)


def test_fixed_coupling_never_resamples_sources():
    c = FixedCoupling(n_pairs=10, seed=3)
    c.setup(*ends())
    x0s, x1s = c.pairs
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x0, x1 = c.sample(32, g)
        # every drawn pair is one of the 10 training pairs, partner included
        d = (x0[:, None] - x0s[None]).norm(dim=-1)
        idx = d.argmin(1)
        assert torch.allclose(d.min(1).values, torch.zeros(32), atol=1e-6)
        torch.testing.assert_close(x1, x1s[idx])
    again = FixedCoupling(n_pairs=10, seed=3)
    again.setup(*ends())
    torch.testing.assert_close(again.pairs[0], x0s)


def test_rotated_180_is_counter_example():
    c = RotatedCoupling(angle=180, n_pairs=50, seed=0)
    c.setup(*ends())
    x0, x1 = c.pairs
    torch.testing.assert_close(x1, 5 - x0)
    # all straight lines cross at t = 1/2 in the common point (2.5, 2.5)
    torch.testing.assert_close(0.5 * x0 + 0.5 * x1, torch.full_like(x0, 2.5))


def test_rotated_general_gaussian_pushes_forward():
    p0, p1 = Gaussian.standard(2), Gaussian(torch.tensor([1.0, -2.0]), torch.tensor([[2.0, 0.5], [0.5, 1.0]]))
    c = RotatedCoupling(angle=90)
    c.setup(p0, p1)
    x0, x1 = c.sample(200_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x1.mean(0), p1.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x1.T), p1.cov, atol=0.03, rtol=0)
    r = rotation_matrix(2, 90).float()
    torch.testing.assert_close(r @ torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)


def test_rotated_needs_gaussians():
    from flowmatch.distributions import Empirical

    with pytest.raises(ValueError, match="Gaussian"):
        RotatedCoupling().setup(Gaussian.standard(2), Empirical(torch.randn(10, 2)))


def test_shuffled_ot_fraction_zero_is_ot_and_one_is_permutation():
    p0, p1 = ends()
    ot = ShuffledOTCoupling(n_pairs=8, seed=1, fraction=0.0)
    ot.setup(p0, p1)
    x0, x1 = ot.pairs
    assert (ot_assignment(x0, x1) == torch.arange(8)).all()
    sh = ShuffledOTCoupling(n_pairs=8, seed=1, fraction=1.0)
    sh.setup(p0, p1)
    torch.testing.assert_close(sh.pairs[0], x0)
    # same multiset of targets, different pairing
    assert torch.allclose(sh.pairs[1].sort(0).values, x1.sort(0).values)
    assert not torch.allclose(sh.pairs[1], x1)


def test_independent_and_bad_n_pairs():
    c = IndependentCoupling()
    c.setup(*ends())
    a, b = c.sample(4)
    assert a.shape == b.shape == (4, 2)
    with pytest.raises(ValueError, match="coupling.n_pairs"):
        FixedCoupling(n_pairs=0)


def test_direction_swaps_ends():
    noise, data = ends()
    assert apply_direction(noise, data, "forward") == (noise, data)
    assert apply_direction(noise, data, "backward") == (data, noise)
    with pytest.raises(ValueError, match="forward"):
        apply_direction(noise, data, "sideways")


def test_fixed_coupling_fresh_sources_keeps_targets_and_stored_pairs():
    """fresh_sources: every batch's targets come from the fixed set, its sources are fresh draws (not the stored
    ones, different at every step), and the stored pairs (for evaluation) are those of the plain fixed coupling."""
    plain = FixedCoupling(n_pairs=16, seed=3)
    plain.setup(*ends())
    c = FixedCoupling(n_pairs=16, seed=3, fresh_sources=True)
    c.setup(*ends())
    torch.testing.assert_close(c.pairs[0], plain.pairs[0])
    torch.testing.assert_close(c.pairs[1], plain.pairs[1])
    x0s, x1s = c.pairs
    g = torch.Generator().manual_seed(0)
    previous = None
    for _ in range(4):
        x0, x1 = c.sample(64, g)
        assert x0.shape == x1.shape == (64, 2)
        assert torch.allclose((x1[:, None] - x1s[None]).norm(dim=-1).min(1).values, torch.zeros(64), atol=1e-6)
        assert (x0[:, None] - x0s[None]).norm(dim=-1).min() > 1e-4  # no stored source is reused
        if previous is not None:
            assert not torch.allclose(x0, previous)
        previous = x0
    torch.testing.assert_close(c.pairs[0], x0s)  # sampling never touches the stored pairing
    assert "fresh_sources=True" in repr(c)


def _digit_like(n=24, seed=0):
    from flowmatch.distributions import Empirical, StandardNormal

    data = torch.rand(n, 1, 3, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return StandardNormal((1, 3, 3)), Empirical(data), data


def test_shuffled_ot_distinct_targets_uses_every_image_once_and_keeps_the_ot_partners():
    p0, p1, data = _digit_like()
    c = ShuffledOTCoupling(n_pairs=24, seed=3, distinct_targets=True)
    c.setup(p0, p1)
    x0, x1 = c.pairs
    key = lambda x: sorted(map(tuple, x.flatten(1).tolist()))  # noqa: E731
    assert key(x1) == key(data)  # each image exactly once
    # the kept OT partners are the OT assignment of the sources to the (shuffled) targets, recomputed here
    torch.testing.assert_close(c.ot_targets, x1[ot_assignment(x0, x1)])
    assert (c.ot_targets != x1).flatten(1).any(1).float().mean() > 0.8  # the shuffle moved (almost) every target
    with pytest.raises(ValueError, match="distinct"):
        ShuffledOTCoupling(n_pairs=4, distinct_targets=True).setup(*ends())  # Gaussian targets: not a finite set
    with pytest.raises(ValueError, match="cannot draw 25 distinct"):
        ShuffledOTCoupling(n_pairs=25, distinct_targets=True).setup(p0, p1)


def test_shuffled_ot_state_dict_round_trip_keeps_ot_partners():
    p0, p1, _ = _digit_like()
    c = ShuffledOTCoupling(n_pairs=10, seed=1, distinct_targets=True)
    c.setup(p0, p1)
    d = ShuffledOTCoupling(n_pairs=10, seed=99, distinct_targets=True)
    d.load_state_dict(c.state_dict())
    d.setup(p0, p1)  # keeps the loaded pairs
    torch.testing.assert_close(d.pairs[1], c.pairs[1])
    torch.testing.assert_close(d.ot_targets, c.ot_targets)


def test_shuffled_ot_auction_solver_gives_the_exact_pairs_at_small_n():
    p0, p1, _ = _digit_like(30)
    exact = ShuffledOTCoupling(n_pairs=30, seed=2, distinct_targets=True)
    exact.setup(p0, p1)
    auction = ShuffledOTCoupling(n_pairs=30, seed=2, distinct_targets=True, solver="auction")
    auction.setup(p0, p1)
    torch.testing.assert_close(auction.pairs[1], exact.pairs[1])
    assert auction.last_assignment.method == "auction" and auction.last_assignment.rel_gap < 1e-5
    with pytest.raises(ValueError, match="coupling.solver"):
        ShuffledOTCoupling(solver="sinkhorn")
