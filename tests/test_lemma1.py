"""Lemma 1 checks (flowmatch.analysis.lemma1) against independent truth: scipy's matrix square root, a rotation
written out by hand, the singular 180-degree field of M = I, and a fit that lowers the error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from flowmatch.analysis.lemma1 import (
    fit_errors,
    fit_rows,
    fit_velocity,
    integrate_field,
    integration_rows,
    lemma1_field,
    line_batch,
    random_target,
)
from flowmatch.analysis.oracle import SingularFieldError
from flowmatch.gaussian import coupling_map, field_params
from flowmatch.models.mlp import MLP


@pytest.mark.parametrize("dim", [2, 5])
def test_random_target_is_spd_non_isotropic_and_seeded(dim):
    mean, cov = random_target(dim, seed=3, eig_range=(0.25, 4.0))
    evals = np.linalg.eigvalsh(cov.numpy())
    assert np.allclose(cov.numpy(), cov.numpy().T)
    assert evals.min() == pytest.approx(0.25) and evals.max() == pytest.approx(4.0)  # condition number 16
    assert not np.allclose(cov.numpy(), np.diag(np.diag(cov.numpy())))  # a rotated, not axis-aligned, M
    again = random_target(dim, seed=3)
    assert torch.equal(again[0], mean) and torch.equal(again[1], cov)
    assert not torch.equal(random_target(dim, seed=4)[1], cov)


def test_rotated_field_reaches_independent_partner():
    """dopri5 through Theta_R = M^{1/2} R - I ends at mu + M^{1/2} R x0, with M^{1/2} from scipy and R by hand."""
    mean, cov = random_target(2, seed=0)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_hat, _ = integrate_field(lemma1_field(*field_params("rot", mean, cov, angle=90.0)), x0)
    root = np.real(scipy.linalg.sqrtm(cov.numpy()))
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])  # 90 degrees counter-clockwise
    truth = mean.numpy() + x0.numpy() @ (root @ rot).T
    assert np.abs(x_hat.numpy() - truth).max() < 1e-9
    x_ot, _ = integrate_field(lemma1_field(*field_params("ot", mean, cov)), x0)
    assert np.abs(x_ot.numpy() - (mean.numpy() + x0.numpy() @ root.T)).max() < 1e-9


def test_integration_rows_tiny_error_and_singular_field_reported():
    mean, cov = random_target(2, seed=0)
    rows = integration_rows(mean, cov, angle=90.0, n=50, seed=1, atol=1e-10, rtol=1e-10)
    assert [r["field"] for r in rows] == ["ot", "rot"]
    assert all(r["status"] == "ok" and r["err_max"] < 1e-10 for r in rows)
    # 180 degrees with M = I: Theta_R = -2 I, every line crosses at t = 1/2 (field undefined there)
    eye = torch.eye(2, dtype=torch.float64)
    rows = integration_rows(torch.zeros(2, dtype=torch.float64), eye, angle=180.0, n=5, seed=1, atol=1e-8, rtol=1e-8)
    assert rows[0]["status"] == "ok" and rows[1]["status"].startswith("singular") and math.isnan(rows[1]["err_max"])
    with pytest.raises(SingularFieldError):
        integrate_field(lemma1_field(*field_params("rot", 0.0, eye, angle=180.0)), torch.zeros(3, 2))


def test_regression_target_is_the_ot_field():
    """Lemma 1: along x_t = (1 - t) x0 + t T(x0) the target x1 - x0 equals v_OT(x_t, t) in closed form."""
    mean, cov = random_target(5, seed=2)
    b_mat, b = coupling_map("ot", mean, cov)
    x_t, t, u = line_batch(b_mat, b, 100, torch.Generator().manual_seed(0))
    v = lemma1_field(*field_params("ot", mean, cov))(x_t, t)
    assert torch.allclose(u, v, atol=1e-12, rtol=0)


def test_fit_lowers_error_and_rows_cover_widths_and_affine():
    mean, cov = random_target(2, seed=0)
    field = lemma1_field(*field_params("ot", mean, cov))
    b_mat, b = coupling_map("ot", mean, cov)
    torch.manual_seed(0)
    model = MLP(2, width=16, depth=2)
    before = fit_errors(model, field, b_mat, b, n_test=256, seed=5, atol=1e-6, rtol=1e-6)["rel_err"]
    fit_velocity(model, b_mat, b, steps=150, batch_size=128, lr=3e-3, seed=0)
    after = fit_errors(model, field, b_mat, b, n_test=256, seed=5, atol=1e-6, rtol=1e-6)["rel_err"]
    assert after < 0.5 * before
    kw = dict(depth=1, steps=5, batch_size=16, lr=1e-3, affine_lr=1e-2, n_test=32, seed=0, atol=1e-5, rtol=1e-5)
    rows = fit_rows(mean, cov, widths=[4, 8], **kw)
    assert [(r["model"], r["width"]) for r in rows] == [("mlp", 4), ("mlp", 8), ("gaussian_affine", "")]
    assert rows == fit_rows(mean, cov, widths=[4, 8], **kw)  # deterministic


@pytest.mark.parametrize(
    "key,value", [("widths", [16, 0]), ("fit_steps", 0), ("eig_range", [4.0, 0.25]), ("atol", -1.0), ("dim", 2.5)]
)
def test_bad_setting_fails_with_one_line(key, value, capsys):
    import importlib.util
    from pathlib import Path

    import yaml
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("evaluate", root / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    block = yaml.safe_load((root / "conf" / "evaluate.yaml").read_text())["lemma1"]
    cfg = OmegaConf.create({"seed": 0, "lemma1": {**block, key: value}})
    assert evaluate._lemma1_settings(OmegaConf.create({"seed": 0, "lemma1": block}))["dim"] == 2
    with pytest.raises(SystemExit) as exc:
        evaluate._lemma1_settings(cfg)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"lemma1.{key} must be" in err and repr(value) in err
