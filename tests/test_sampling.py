import math

import pytest
import torch

from flowmatch.sampling import Solver


def linear_field(x, t):
    return -x  # dx/dt = -x: x(1) = x0 e^{-1}


@pytest.mark.parametrize(
    "method,steps,nfe_per_step,tol", [("euler", 1000, 1, 1e-3), ("midpoint", 50, 2, 1e-4), ("rk4", 10, 4, 1e-6)]
)
def test_fixed_grid_accuracy_and_nfe(method, steps, nfe_per_step, tol):
    x0 = torch.randn(4, 3, dtype=torch.float64)
    res = Solver(method, steps=steps).integrate(linear_field, x0)
    torch.testing.assert_close(res.x1, x0 * math.exp(-1), rtol=tol, atol=tol)
    assert res.nfe == steps * nfe_per_step


def test_euler_one_step_is_explicit_formula():
    x0 = torch.randn(5, 2)
    v = lambda x, t: torch.sin(x) + t[:, None]  # noqa: E731
    res = Solver("euler", steps=1).integrate(v, x0)
    torch.testing.assert_close(res.x1, x0 + torch.sin(x0) + 0.0)


def test_dopri5_tolerance_and_trajectory():
    x0 = torch.randn(3, 2, dtype=torch.float64)
    res = Solver("dopri5", atol=1e-9, rtol=1e-9).integrate(linear_field, x0, return_traj=True, traj_points=11)
    torch.testing.assert_close(res.x1, x0 * math.exp(-1), rtol=1e-7, atol=1e-7)
    assert res.traj.shape == (11, 3, 2) and res.nfe > 6
    torch.testing.assert_close(res.traj[5], x0 * math.exp(-0.5), rtol=1e-7, atol=1e-7)


def test_time_is_per_sample_vector():
    seen = []
    Solver("euler", steps=4).integrate(lambda x, t: (seen.append(t.clone()), torch.zeros_like(x))[1], torch.zeros(7, 2))
    assert all(t.shape == (7,) for t in seen)
    torch.testing.assert_close(torch.stack([t[0] for t in seen]), torch.tensor([0.0, 0.25, 0.5, 0.75]))


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"method": "heun"}, "solver.method"),
        ({"steps": 0}, "solver.steps"),
        ({"method": "dopri5", "atol": 0}, "solver.atol"),
    ],
)
def test_bad_solver_config(kwargs, key):
    with pytest.raises(ValueError, match=key):
        Solver(**kwargs)


def test_tags():
    assert Solver("euler", steps=7).tag == "euler7"
    assert Solver("rk4", steps=20).tag == "rk4_20"
    assert Solver("dopri5").tag == "dopri5"
