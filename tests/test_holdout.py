"""Held-out pairs (``coupling.n_holdout``): made by each coupling's procedure, disjoint from the training pairs,
drawn from their own random stream (the training pairs and batches are bit-identical with and without them),
and saved with the coupling's state."""

from __future__ import annotations

import pytest
import torch

from flowmatch.couplings import (
    FixedCoupling,
    IndependentCoupling,
    OTCoupling,
    ReflowCoupling,
    RotatedCoupling,
    ShuffledOTCoupling,
    ot_assignment,
)
from flowmatch.data import GaussianDataModule
from flowmatch.distributions import Gaussian

FACTORIES = {
    "independent": lambda h: IndependentCoupling(n_holdout=h, seed=3),
    "ot": lambda h: OTCoupling(n_holdout=h, seed=3),
    "fixed": lambda h: FixedCoupling(n_pairs=40, seed=3, n_holdout=h),
    "fixed_fresh_sources": lambda h: FixedCoupling(n_pairs=40, seed=3, fresh_sources=True, n_holdout=h),
    "rotated_finite": lambda h: RotatedCoupling(angle=180, n_pairs=40, seed=3, n_holdout=h),
    "rotated_fresh": lambda h: RotatedCoupling(angle=180, n_pairs=None, seed=3, n_holdout=h),
    "shuffled_ot": lambda h: ShuffledOTCoupling(n_pairs=40, seed=3, fraction=0.5, n_holdout=h),
}


def ends(dim=2):
    return Gaussian.standard(dim), Gaussian(torch.full((dim,), 5.0), 1.0)


def first_batches(coupling, n_batches=3, batch_size=32):
    """The first training batches of the DataModule's stream (rank 0's ``train`` stream)."""
    dm = GaussianDataModule(coupling, dim=2, batch_size=batch_size, seed=3)
    dm.setup()
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n_batches)]


def rows(x0, x1):
    return torch.cat([x0.flatten(1), x1.flatten(1)], 1)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_training_pairs_and_batches_unchanged_by_holdout(name):
    without, with_ = FACTORIES[name](0), FACTORIES[name](64)
    a, b = first_batches(without), first_batches(with_)
    assert without.holdout is None and len(with_.holdout[0]) == 64
    if without.pairs is not None:
        assert torch.equal(without.pairs[0], with_.pairs[0]) and torch.equal(without.pairs[1], with_.pairs[1])
    for (x0a, x1a), (x0b, x1b) in zip(a, b):
        assert torch.equal(x0a, x0b) and torch.equal(x1a, x1b)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_holdout_disjoint_from_training_pairs(name):
    c = FACTORIES[name](64)
    batches = first_batches(c)
    held = rows(*c.holdout)
    train = rows(*c.pairs) if c.pairs is not None else torch.cat([rows(*b) for b in batches])
    same = (held[:, None] == train[None]).all(-1)  # a held-out pair equal to a training pair in every coordinate
    assert not bool(same.any())
    assert not bool((c.holdout[0][:, None] == train[None, :, :2]).all(-1).any())  # no training source reused
    assert len(torch.unique(held, dim=0)) == len(held)


def test_holdout_follows_each_procedure():
    p0, p1 = ends()
    rot = RotatedCoupling(angle=180, n_pairs=10, seed=0, n_holdout=32)
    rot.setup(p0, p1)
    torch.testing.assert_close(rot.holdout[1], 5 - rot.holdout[0])  # the rule, on fresh sources
    ot = OTCoupling(n_holdout=32)
    ot.setup(p0, p1)
    assert torch.equal(ot_assignment(*ot.holdout), torch.arange(32))  # already OT-paired
    sh = ShuffledOTCoupling(n_pairs=10, fraction=0.0, n_holdout=32)
    sh.setup(p0, p1)
    assert torch.equal(ot_assignment(*sh.holdout), torch.arange(32))  # OT then no shuffle: OT over its own set
    fixed = FixedCoupling(n_pairs=10, seed=0, n_holdout=2000)
    fixed.setup(p0, p1)
    h0, h1 = fixed.holdout  # fresh sources and fresh targets drawn independently of each other
    assert abs(float(torch.corrcoef(torch.stack([h0[:, 0], h1[:, 0]]))[0, 1])) < 0.1
    torch.testing.assert_close(h1.mean(0), torch.full((2,), 5.0), atol=0.1, rtol=0)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_holdout_saved_and_restored(name):
    c = FACTORIES[name](16)
    c.setup(*ends())
    state = c.state_dict()
    other = FACTORIES[name](16)
    other.seed = 99  # would draw other pairs: they must come from the state
    other.load_state_dict(state)
    other.setup(*ends())
    assert torch.equal(other.holdout[0], c.holdout[0]) and torch.equal(other.holdout[1], c.holdout[1])
    if c.pairs is not None:
        assert torch.equal(other.pairs[0], c.pairs[0])


def test_reflow_holds_out_the_last_pairs(tmp_path):
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g)
    path = tmp_path / "pairs.pt"
    torch.save({"x0": x0, "x1": x1}, path)
    c = ReflowCoupling(str(path), n_holdout=8)
    c.setup(*ends())
    assert torch.equal(c.pairs[0], x0[:22]) and torch.equal(c.holdout[1], x1[22:])
    plain = ReflowCoupling(str(path))
    plain.setup(*ends())
    assert plain.holdout is None and len(plain.pairs[0]) == 30
    with pytest.raises(ValueError, match="coupling.n_holdout=30 must be < the 30 pairs"):
        ReflowCoupling(str(path), n_holdout=30).setup(*ends())


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8", None])
def test_bad_n_holdout(bad):
    with pytest.raises(ValueError, match="coupling.n_holdout must be an integer >= 0"):
        FixedCoupling(n_holdout=bad)
