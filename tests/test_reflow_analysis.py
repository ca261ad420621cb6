"""Lemma 2's closed form (flowmatch/analysis/reflow.py) against an arctan formula, the sigma = 0 identity and a
Monte Carlo ReFlow: the population field fitted by least squares on samples and integrated step by step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowmatch.analysis.reflow import fitted_rotation, reflow_rotation_angle
from flowmatch.gaussian import rotation_matrix


@pytest.mark.parametrize("angle", [10.0, 30.0, 90.0, 150.0, 179.0])
def test_sigma_zero_returns_the_coupling(angle):
    assert reflow_rotation_angle(angle, 0.0) == pytest.approx(angle, abs=1e-6)


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.3, 1.0])
def test_ninety_degrees_matches_the_arctan_formula(sigma):
    c = 0.5 + sigma**2  # s_t = 2 (t - 1/2)^2 + c at 90 degrees
    expected = math.degrees(2 / math.sqrt(2 * c) * math.atan(math.sqrt(2 / c) / 2))
    assert reflow_rotation_angle(90.0, sigma) == pytest.approx(expected, rel=1e-9)


def test_one_eighty_degrees_goes_to_ot_with_noise_and_is_undefined_without():
    assert reflow_rotation_angle(180.0, 0.05) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(reflow_rotation_angle(180.0, 0.0))


@pytest.mark.parametrize("angle,sigma", [(90.0, 0.3), (120.0, 0.2), (180.0, 0.3)])
def test_monte_carlo_reflow_matches_the_closed_form(angle, sigma):
    """E[u | x_t] is linear for Gaussians: regress u on x_t at each midpoint time (Monte Carlo), integrate
    x' = v(x, t) with the midpoint grid, fit the resulting map's rotation: it is Theta(sigma)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([5.0, 5.0], dtype=torch.float64)
    r = rotation_matrix(2, angle).double()
    n, steps = 40_000, 200
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    u = mu + x0 @ (r - torch.eye(2, dtype=torch.float64)).T
    probe = torch.randn(500, 2, generator=g, dtype=torch.float64)
    x = probe.clone()
    for k in range(steps):
        t = (k + 0.5) / steps
        xt = t * mu + (1 - t) * x0 + t * (x0 @ r.T) + sigma * torch.randn(n, 2, generator=g, dtype=torch.float64)
        design = torch.cat([xt, torch.ones(n, 1, dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(design, u).solution  # v(x, t) = [x, 1] @ coef
        # an Euler step of length 1 / steps with the field fitted at the step's midpoint time
        x = x + (torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1) @ coef) / steps
    fit = fitted_rotation(probe.numpy(), (x - mu).numpy())
    assert fit["angle_deg"] == pytest.approx(reflow_rotation_angle(angle, sigma), abs=1.0)
    assert fit["scale_min"] == pytest.approx(1.0, abs=0.03) and fit["scale_max"] == pytest.approx(1.0, abs=0.03)


def test_fitted_rotation_recovers_a_rotation_and_a_shift():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((300, 2))
    th = math.radians(-70.0)
    q = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    fit = fitted_rotation(x0, 2.0 * x0 @ q.T + 3.0)
    assert fit["angle_deg"] == pytest.approx(-70.0, abs=1e-9)
    assert fit["scale_min"] == pytest.approx(2.0) and fit["scale_max"] == pytest.approx(2.0)
    assert fit["rms_residual"] < 1e-9 and fit["det_sign"] == 1.0
