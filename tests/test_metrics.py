import pytest
import torch

from flowmatch import metrics as M
from flowmatch.distributions import Gaussian
from flowmatch.evaluation import EvalOptions, EvalSetup, evaluate_flow
from flowmatch.gaussian import gaussian_w2
from flowmatch.sampling import Solver


def _w2(*args):
    return float(gaussian_w2(*args))


def test_pair_accuracy_and_l2():
    targets = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x_hat = torch.tensor([[0.1, 0.0], [0.0, 9.0], [0.0, 9.5]])  # 1st right, 2nd nearest to #2, 3rd right
    assert M.pair_accuracy(x_hat, targets) == pytest.approx(2 / 3)
    assert M.mean_l2(x_hat, targets) == pytest.approx((0.1 + (100 + 81) ** 0.5 + 0.5) / 3)


def test_mmd_zero_for_same_distribution_positive_for_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    same = M.mmd2_rbf(a, b)
    shifted = M.mmd2_rbf(a, b + 1.0)
    assert abs(same) < 0.01 and shifted > 0.1


def test_mmd_unbiased_estimator_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 2, generator=g), torch.randn(7, 2, generator=g) + 0.5
    pooled = torch.cat([x, y]).double()
    d = [((pooled[i] - pooled[j]) ** 2).sum().sqrt() for i in range(13) for j in range(13) if i != j]
    h = torch.stack(d).median()

    def k(a, b):
        d2 = ((a.double() - b.double()) ** 2).sum()
        return sum(torch.exp(-d2 / (2 * (s * h) ** 2)) for s in (0.5, 1.0, 2.0)) / 3

    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / 42
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(7)) / 42
    assert M.mmd2_rbf(x, y) == pytest.approx(float(xx + yy - 2 * xy), rel=1e-9)


def test_gaussian_w2_closed_forms():
    # 1-D: W2 = sqrt((m0 - m1)^2 + (s0 - s1)^2)
    assert _w2(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]), torch.tensor([[1.0]])) == pytest.approx(
        (4 + 1) ** 0.5
    )
    # commuting (diagonal) covariances: sum over coordinates
    s0, s1 = torch.diag(torch.tensor([1.0, 9.0])), torch.diag(torch.tensor([4.0, 1.0]))
    assert _w2(torch.zeros(2), s0, torch.zeros(2), s1) == pytest.approx((1 + 4) ** 0.5)


def test_evaluate_flow_on_exact_translation_field():
    """The field v = 5 transports x0 exactly to x0 + 5 = T_OT(x0) for N(0,I) -> N(5,I)."""
    p0, p1 = Gaussian.standard(2), Gaussian(torch.full((2,), 5.0), 1.0)
    x0 = p0.sample(30, torch.Generator().manual_seed(0))
    pairs = (x0, x0 + 5)
    setup = EvalSetup(p0, p1, pairs, ot_map=lambda x: x + 5, target_moments=(p1.mean, p1.cov))
    res = evaluate_flow(
        lambda x, t: torch.full_like(x, 5.0),
        setup,
        Solver("euler", steps=3),
        EvalOptions(euler_steps=[1, 7], n_fresh=400, keep_trajectories=[7]),
    )
    m = res.metrics
    assert m["eval/pair_acc"] == 1.0 and m["eval/pair_acc@euler1"] == 1.0 and m["eval/pair_acc@euler7"] == 1.0
    assert m["eval/l2_partner"] < 1e-5 and m["eval/l2_ot@euler7"] < 1e-5
    assert m["eval/nfe"] == 3.0 and m["eval/w2"] < 0.2 and abs(m["eval/mmd_gen"]) < 0.02
    assert res.trajectories["euler7"].shape == (8, 30, 2)


def test_pair_stds_chunking_and_kept_ot_partners():
    """eval/l2_*_std are the sample standard deviations of the per-source distances (a naive loop); chunked
    integration (eval.batch_size) gives the numbers of one batch; kept OT partners (ot_targets) are used as given,
    else the coupling's assign() over the whole pair set."""
    p0 = Gaussian.standard(2)
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(25, 2, generator=g), torch.randn(25, 2, generator=g) + 3
    kept = torch.randn(25, 2, generator=g) + 3

    def velocity(x, t):
        return torch.full_like(x, 3.0)

    calls = []

    def assign(a, b):
        calls.append(len(a))
        return torch.arange(len(a)).flip(0)

    setup = EvalSetup(p0, Gaussian(torch.full((2,), 3.0), 1.0), (x0, x1), ot_targets=kept, assign=assign)
    opts = EvalOptions(euler_steps=[2], n_fresh=8)
    one = evaluate_flow(velocity, setup, Solver("euler", steps=4), opts).metrics
    chunked = evaluate_flow(velocity, setup, Solver("euler", steps=4), EvalOptions(euler_steps=[2], n_fresh=8,
                            batch_size=7)).metrics  # fmt: skip
    end = x0 + 3.0
    d = [float((end[i] - x1[i]).norm()) for i in range(25)]
    d_ot = [float((end[i] - kept[i]).norm()) for i in range(25)]
    mean, mean_ot = sum(d) / 25, sum(d_ot) / 25
    assert one["eval/l2_partner"] == pytest.approx(mean, rel=1e-6)
    assert one["eval/l2_partner_std"] == pytest.approx((sum((v - mean) ** 2 for v in d) / 24) ** 0.5, rel=1e-6)
    assert one["eval/l2_ot"] == pytest.approx(mean_ot, rel=1e-6)
    assert one["eval/l2_ot_std"] == pytest.approx((sum((v - mean_ot) ** 2 for v in d_ot) / 24) ** 0.5, rel=1e-6)
    assert "eval/l2_partner_std@euler2" not in one and "eval/l2_ot@euler2" in one
    for key in ("eval/l2_partner", "eval/l2_ot_std", "eval/pair_acc", "eval/l2_ot@euler2"):
        assert chunked[key] == pytest.approx(one[key], rel=1e-6)
    assert calls == []  # kept OT partners: no assignment solved
    setup.ot_targets = None
    m = evaluate_flow(velocity, setup, Solver("euler", steps=4), opts).metrics
    assert calls == [25]  # once, for both the solver and the Euler keys
    assert m["eval/l2_ot"] == pytest.approx(float((end - x1.flip(0)).norm(dim=1).mean()), rel=1e-6)
