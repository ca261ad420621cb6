"""flowmatch.stability against fields whose flow maps are known in closed form.

- v(x, t) = A x + b with a constant non-normal A: Phi_{s->1}(x) = E x + A^{-1}(E - I) b with E = expm(A (1 - s)),
  so every perturbation ratio is ||E d|| exactly, and K Euler steps from x0 give (I + A/K)^K x0 + (sum) b.
- The Lemma-1 field v(x, t) = theta + Theta (I + t Theta)^{-1} (x - t theta) (time-dependent): its trajectories
  are the straight lines x_t = x0 + t (theta + Theta x0), so
  Phi_{s->1}(x) = theta + (I + Theta)(I + s Theta)^{-1}(x - s theta), with Jacobian (I + Theta)(I + s Theta)^{-1}.
"""

from __future__ import annotations

import pytest
import torch

from flowmatch.stability import (
    endpoint_errors,
    perturbation_sensitivity,
    reference_solver,
    states_at,
    unit_directions,
)

D = 3
A = torch.tensor([[-0.5, 2.0, 0.0], [-1.0, 0.3, 0.4], [0.2, 0.0, -1.2]], dtype=torch.float64)  # non-normal
B = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)


def affine(x, t):
    return x @ A.T + B


def affine_flow(x, s: float, t: float = 1.0):
    """Phi_{s->t}(x) of v = A x + b."""
    e = torch.linalg.matrix_exp(A * (t - s))
    return x @ e.T + torch.linalg.solve(A, (e - torch.eye(D, dtype=A.dtype)) @ B)


def euler_affine(x0, k: int):
    """K Euler steps of v = A x + b: x <- (I + A/K) x + b/K, by a plain loop."""
    x = x0.clone()
    for _ in range(k):
        x = x + (x @ A.T + B) / k
    return x


@pytest.fixture
def x0():
    return torch.randn(16, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_states_at_match_the_flow_map(x0):
    times = [0.0, 0.25, 0.6, 0.9]
    states = states_at(affine, x0, times, reference_solver(1e-10, 1e-10))
    assert states.shape == (4, 16, D)
    torch.testing.assert_close(states[0], x0)
    for t, xt in zip(times, states):
        torch.testing.assert_close(xt, affine_flow(x0, 0.0, t), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_affine_sensitivity_is_the_norm_of_expm_times_direction(x0, eps):
    """Linear flow map: the ratio is ||expm(A (1 - t)) d|| whatever eps."""
    times = [0.0, 0.3, 0.7]
    dirs = unit_directions(16, 5, (D,), torch.Generator().manual_seed(1), dtype=torch.float64)
    sens = perturbation_sensitivity(affine, x0, times, eps, dirs, reference_solver(1e-10, 1e-10))
    assert sens.ratios.shape == (3, 16, 5) and len(sens.nfe) == 3
    for k, t in enumerate(times):
        e = torch.linalg.matrix_exp(A * (1 - t))
        expected = (dirs @ e.T).norm(dim=-1)
        torch.testing.assert_close(sens.ratios[k], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sens.mean_over_directions(), sens.ratios.mean(2))


def test_endpoint_errors_match_the_euler_recursion(x0):
    x1_ref = reference_solver(1e-10, 1e-10).integrate(affine, x0).x1
    torch.testing.assert_close(x1_ref, affine_flow(x0, 0.0), rtol=1e-8, atol=1e-8)
    steps = [1, 2, 4, 8, 16, 32]
    rows = endpoint_errors(affine, x0, x1_ref, methods=("euler", "rk4"), steps=steps)
    assert [(r["method"], r["steps"]) for r in rows] == [(m, k) for m in ("euler", "rk4") for k in steps]
    transport = (x1_ref - x0).norm(dim=1).mean()
    for r in rows[: len(steps)]:
        err = (euler_affine(x0, r["steps"]) - x1_ref).norm(dim=1)
        assert r["nfe"] == r["steps"]
        assert r["err_mean"] == pytest.approx(float(err.mean()), rel=1e-6)
        assert r["err_max"] == pytest.approx(float(err.max()), rel=1e-6)
        assert r["rel_err"] == pytest.approx(float(err.mean() / transport), rel=1e-6)
    euler = [r["err_mean"] for r in rows[: len(steps)]]
    rk4 = [r["err_mean"] for r in rows[len(steps) :]]
    assert euler[-2] / euler[-1] == pytest.approx(2.0, rel=0.1)  # first order
    assert rk4[-3] / rk4[-2] == pytest.approx(16.0, rel=0.2)  # fourth order
    assert [r["nfe"] for r in rows[len(steps) :]] == [4 * k for k in steps]


def lemma1_field(theta, Theta):
    eye = torch.eye(len(theta), dtype=theta.dtype)

    def v(x, t):
        m = eye + t[:, None, None] * Theta  # (B, d, d)
        return theta + torch.linalg.solve(m, ((x - t[:, None] * theta) @ Theta.T).unsqueeze(-1)).squeeze(-1)

    return v


def test_time_dependent_field_sensitivity_and_endpoint(x0):
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    root = q @ torch.diag(torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64)) @ q.T  # M^{1/2}, SPD
    theta, Theta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), root - torch.eye(D, dtype=torch.float64)
    v = lemma1_field(theta, Theta)
    solver = reference_solver(1e-10, 1e-10)
    torch.testing.assert_close(solver.integrate(v, x0).x1, theta + x0 @ root.T, rtol=1e-7, atol=1e-7)
    times = [0.0, 0.5, 0.9]
    dirs = unit_directions(16, 3, (D,), torch.Generator().manual_seed(4), dtype=torch.float64)
    sens = perturbation_sensitivity(v, x0, times, 1e-3, dirs, solver)
    eye = torch.eye(D, dtype=torch.float64)
    for k, s in enumerate(times):
        jac = (eye + Theta) @ torch.linalg.inv(eye + s * Theta)
        torch.testing.assert_close(sens.ratios[k], (dirs @ jac.T).norm(dim=-1), rtol=1e-6, atol=1e-6)


def test_unit_directions_have_unit_norm_and_image_shape():
    d = unit_directions(4, 3, (1, 8, 8), torch.Generator().manual_seed(0))
    assert d.shape == (4, 3, 1, 8, 8)
    torch.testing.assert_close(d.flatten(2).norm(dim=-1), torch.ones(4, 3))


@pytest.mark.parametrize(
    "call,key",
    [
        (lambda x0, d: states_at(affine, x0, [0.5, 0.2], reference_solver()), "stability.times"),
        (lambda x0, d: states_at(affine, x0, [1.0], reference_solver()), "stability.times"),
        (lambda x0, d: perturbation_sensitivity(affine, x0, [0.0], 0.0, d, reference_solver()), "stability.eps"),
        (lambda x0, d: endpoint_errors(affine, x0, x0, methods=("dopri5",)), "stability.methods"),
        (lambda x0, d: perturbation_sensitivity(affine, x0, [0.0], 1e-3, d[:3], reference_solver()), "directions"),
    ],
)
def test_bad_input_is_named(x0, call, key):
    d = unit_directions(16, 2, (D,), dtype=torch.float64)
    with pytest.raises(ValueError, match=key):
        call(x0, d)


def test_stability_rows_of_the_affine_field(x0):
    """One table: the reference (its gap to a looser dopri5 is small), one endpoint row per (method, steps), and per
    time the mean amplification, equal to the mean of ||expm(A (1 - t)) d|| over sources and directions."""
    from flowmatch.stability import stability_rows

    dirs = unit_directions(16, 4, (D,), torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = stability_rows(
        affine, x0, dirs, methods=("euler", "midpoint"), steps=(1, 8), times=(0.0, 0.5), atol=1e-10, rtol=1e-10
    )
    assert [r["measure"] for r in rows] == ["reference"] + ["endpoint_error"] * 4 + ["sensitivity"] * 2
    assert rows[0]["gap_mean"] < 1e-4
    for r in rows[-2:]:
        e = torch.linalg.matrix_exp(A * (1 - r["t"]))
        per_source = (dirs @ e.T).norm(dim=-1).mean(1)
        assert r["mean"] == pytest.approx(float(per_source.mean()), rel=1e-6)
        assert r["median"] == pytest.approx(float(per_source.median()), rel=0.2)  # quantile interpolates
        assert r["q10"] <= r["median"] <= r["q90"] <= r["max"] and r["n_directions"] == 4
