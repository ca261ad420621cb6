import pytest
import torch

from flowmatch.interpolants import CFM, Bridge, Linear
from flowmatch.losses import per_sample_loss

ALL = [Linear(), CFM(0.3), Bridge(0.3)]


@pytest.mark.parametrize("interp", ALL, ids=lambda i: i.name)
def test_velocity_is_time_derivative(interp):
    """u_t equals dx_t/dt by autograd with (x0, x1, eps) held fixed."""
    g = torch.Generator().manual_seed(0)
    x0, x1, eps = (torch.randn(16, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.98 + 0.01
    t.requires_grad_(True)
    xt = interp.x_t(x0, x1, t, eps)
    jac = torch.stack([torch.autograd.grad(xt[:, j].sum(), t, retain_graph=True)[0] for j in range(3)], 1)
    torch.testing.assert_close(jac, interp.u_t(x0, x1, t.detach(), eps), rtol=1e-10, atol=1e-10)


def test_sigma_zero_makes_all_identical():
    g = torch.Generator().manual_seed(1)
    x0, x1, eps = (torch.randn(8, 2, generator=g) for _ in range(3))
    t = torch.rand(8, generator=g)
    outs = [cls(0.0)(x0, x1, t, eps) for cls in (Linear, CFM, Bridge)]
    for path in outs[1:]:
        torch.testing.assert_close(path.x_t, outs[0].x_t)
        torch.testing.assert_close(path.u_t, outs[0].u_t)
    torch.testing.assert_close(outs[0].u_t, x1 - x0)


def test_path_sample_indexing_selects_the_same_samples_in_every_field():
    g = torch.Generator().manual_seed(2)
    x0, x1, eps = (torch.randn(6, 3, generator=g) for _ in range(3))
    path = CFM(0.1)(x0, x1, torch.rand(6, generator=g), eps)
    idx = torch.tensor([4, 0, 2])
    sub = path[idx]
    assert len(path) == 6 and len(sub) == 3 and len(path[1:3]) == 2
    for name in ("x0", "x1", "t", "eps", "x_t", "u_t"):
        torch.testing.assert_close(getattr(sub, name), getattr(path, name)[idx])


def test_endpoints_and_marginal_noise():
    x0, x1 = torch.zeros(20000, 1), torch.ones(20000, 1)
    for t_val, std in [(0.0, 0.0), (0.5, 0.3 * 0.5), (1.0, 0.0)]:
        t = torch.full((20000,), t_val)
        xt = Bridge(0.3)(x0, x1, t).x_t
        assert abs(float(xt.mean()) - t_val) < 0.01
        assert abs(float(xt.std()) - std) < 0.01


@pytest.mark.parametrize("cls", [CFM, Bridge, Linear])
def test_negative_sigma_rejected(cls):
    with pytest.raises(ValueError, match="interpolant.sigma"):
        cls(-0.1)


def test_linear_rejects_positive_sigma():
    with pytest.raises(ValueError, match="interpolant.sigma"):
        Linear(0.1)


def test_per_sample_loss_matches_definition():
    x0, x1 = torch.randn(5, 4), torch.randn(5, 4)
    t = torch.rand(5)
    model = lambda x, tt: 2 * x  # noqa: E731
    loss = per_sample_loss(model, Linear()(x0, x1, t, torch.zeros_like(x0)))
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    expected = ((2 * xt - (x1 - x0)) ** 2).mean(1)
    torch.testing.assert_close(loss, expected)
