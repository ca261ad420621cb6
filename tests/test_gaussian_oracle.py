"""Closed-form Gaussian oracle: OT map / W2, Lemma-1 fields, exact loss and gradient-variance moments.

Independent truths used here: scipy's matrix square root, a rotation built in this file, POT's Gaussian
map, Monte Carlo with per-sample autograd gradients of the real model and loss (float64, fixed seeds),
and the exact quadratic expansion of the autograd gradient in the Gaussian noise (g is a quadratic
polynomial of xi, so its Taylor coefficients at 0 give E g and Var g exactly).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.func import functional_call, grad, jacrev, vmap

from flowmatch.analysis import (
    GaussianProblem,
    SingularFieldError,
    expected_grad_variance,
    expected_loss,
    expected_moments,
    field_gradvar_table,
    lemma1_field,
)
from flowmatch.gaussian import field_params, gaussian_ot_map, gaussian_w2, rotation_matrix, singular_times
from flowmatch.interpolants import INTERPOLANTS
from flowmatch.losses import per_sample_loss
from flowmatch.models.gaussian_affine import GaussianAffine

F64 = torch.float64
GP = GaussianProblem.of  # (mean, cov, coupling, interpolant, sigma, angle)
INTERPS = [("linear", 0.0), ("cfm", 0.3), ("bridge", 0.3)]
COUPLINGS = ["independent", "ot", "rotated"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------- reference constructions


def rand_spd(d, seed, lo=0.3, hi=2.5):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q @ np.diag(np.linspace(lo, hi, d)) @ q.T


def problem(d):
    """A target N(mu, M) with a non-trivial mean and distinct, non-axis-aligned eigenvalues."""
    mu = np.linspace(1.0, -2.0, d) + 0.5
    return torch.tensor(mu, dtype=F64), torch.tensor(rand_spd(d, 100 + d), dtype=F64)


def ref_sqrtm(m):
    r = scipy.linalg.sqrtm(np.asarray(m, dtype=np.float64))
    return torch.tensor(np.real(r), dtype=F64)


def ref_rotation(d, angle):
    r = np.eye(d)
    a = math.radians(angle)
    for i in range(0, d - 1, 2):
        r[i : i + 2, i : i + 2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return torch.tensor(r, dtype=F64)


def ref_map(coupling, mu, M, angle):
    """x1 = B x0 + mu for the deterministic couplings (built without the package)."""
    s = ref_sqrtm(M)
    return s if coupling == "ot" else s @ ref_rotation(len(mu), angle)


def sample_pairs(coupling, mu, M, angle, n, gen):
    d = len(mu)
    x0 = torch.randn(n, d, generator=gen, dtype=F64)
    if coupling == "independent":
        x1 = mu + torch.randn(n, d, generator=gen, dtype=F64) @ ref_sqrtm(M).T
    else:
        x1 = mu + x0 @ ref_map(coupling, mu, M, angle).T
    eps = torch.randn(n, d, generator=gen, dtype=F64)
    return x0, x1, eps


def make_model(d, kind, mu, M, angle, seed=0):
    model = GaussianAffine(d).double()
    if kind in ("perturbed", "shifted"):  # off the fields; "shifted" makes the mean residual large
        s_theta, s_Theta = (0.3, 0.2) if kind == "perturbed" else (1.5, 0.3)
        model.set_field("ot", mu, M)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.theta.add_(s_theta * torch.randn(d, generator=g, dtype=F64))
            model.Theta.add_(s_Theta * torch.randn(d, d, generator=g, dtype=F64))
    else:
        model.set_field(kind, mu, M, angle)
    return model


def per_sample_grads(model, interp, x0, x1, t, eps):
    """(losses (N,), flattened per-sample gradients (N, d + d^2)) through the real loss, by vmap(grad)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, a, b, tt, e):
        f = lambda x, s: functional_call(model, p, (x, s))
        return per_sample_loss(f, interp(a[None], b[None], tt[None], e[None]))[0]

    def one_with_loss(p, a, b, tt, e):
        g = grad(one)(p, a, b, tt, e)
        return torch.cat([g["theta"].reshape(-1), g["Theta"].reshape(-1)]), one(p, a, b, tt, e)

    g, losses = vmap(one_with_loss, in_dims=(None, 0, 0, 0, 0))(params, x0, x1, t, eps)
    return losses, g


def mc_estimates(losses, g):
    n = len(losses)
    q = ((g - g.mean(0)) ** 2).sum(1) * n / (n - 1)
    return (losses.mean().item(), losses.std().item() / math.sqrt(n), q.mean().item(), q.std().item() / math.sqrt(n))


# ----------------------------------------------------------------------------- OT map and W2


def test_ot_map_pushes_forward_and_is_symmetric_psd():
    d = 4
    s0, s1 = torch.tensor(rand_spd(d, 1), dtype=F64), torch.tensor(rand_spd(d, 2, 0.1, 4.0), dtype=F64)
    m0, m1 = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64), torch.tensor([3.0, 1.0, -1.0, 0.2], dtype=F64)
    a, b = gaussian_ot_map(m0, s0, m1, s1)
    assert torch.allclose(a @ s0 @ a.T, s1, atol=1e-10)
    assert torch.allclose(a @ m0 + b, m1, atol=1e-12)
    assert torch.allclose(a, a.T, atol=1e-12)
    assert torch.linalg.eigvalsh(a).min() > 0
    # Brenier: the symmetric PSD pushforward is the OT map; compare with POT as a second implementation.
    from ot import gaussian as ot_gauss  # POT, a dev dependency

    a_pot, b_pot = ot_gauss.bures_wasserstein_mapping(m0.numpy(), m1.numpy(), s0.numpy(), s1.numpy())
    assert np.allclose(a.numpy(), np.asarray(a_pot), atol=1e-8)
    assert np.allclose(b.numpy(), np.asarray(b_pot).reshape(-1), atol=1e-8)
    # float32 in -> float32 out
    a32, _ = gaussian_ot_map(m0.float(), s0.float(), m1.float(), s1.float())
    assert a32.dtype == torch.float32


def test_ot_map_requires_pd_source():
    with pytest.raises(ValueError, match="positive definite"):
        gaussian_ot_map(torch.zeros(2), torch.diag(torch.tensor([1.0, 0.0])), torch.zeros(2), torch.eye(2))


def test_w2_closed_forms():
    # 1-D: (m0 - m1)^2 + (s0 - s1)^2 with standard deviations s
    w = gaussian_w2([1.0], [[4.0]], [-2.0], [[0.25]])
    assert abs(w.item() - math.sqrt(9.0 + 1.5**2)) < 1e-12
    assert abs(gaussian_w2([1.0], [[4.0]], [-2.0], [[0.25]], squared=True).item() - (9.0 + 2.25)) < 1e-12
    # commuting covariances: ||m0 - m1||^2 + ||S0^{1/2} - S1^{1/2}||_F^2
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((3, 3)))
    d0, d1 = np.array([0.5, 1.0, 3.0]), np.array([2.0, 0.1, 3.0])
    s0, s1 = q @ np.diag(d0) @ q.T, q @ np.diag(d1) @ q.T
    m0, m1 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    expect = np.sum((m0 - m1) ** 2) + np.sum((np.sqrt(d0) - np.sqrt(d1)) ** 2)
    assert abs(gaussian_w2(m0, s0, m1, s1, squared=True).item() - expect) < 1e-10
    # non-commuting: W2^2 equals the transport cost E||T(x) - x||^2 of the OT map
    s0, s1 = torch.tensor(rand_spd(3, 5), dtype=F64), torch.tensor(rand_spd(3, 6, 0.2, 5.0), dtype=F64)
    m0, m1 = torch.tensor(m0), torch.tensor(m1)
    a, b = gaussian_ot_map(m0, s0, m1, s1)
    e = torch.eye(3, dtype=F64)
    cost = ((a - e) @ m0 + b).pow(2).sum() + torch.trace((a - e) @ s0 @ (a - e).T)
    assert abs(gaussian_w2(m0, s0, m1, s1, squared=True).item() - cost.item()) < 1e-10
    assert gaussian_w2(m0, s0, m0, s0).item() < 1e-6


def test_rotation_matrix():
    r = rotation_matrix(5, 90.0)
    assert torch.allclose(r, ref_rotation(5, 90.0), atol=1e-15)
    assert torch.allclose(r @ r.T, torch.eye(5, dtype=F64)) and r[4, 4] == 1.0
    r180 = rotation_matrix(4, 180.0)
    assert torch.equal(r180, -torch.eye(4, dtype=F64))  # exact, so the t = 1/2 crossing is exact
    assert torch.allclose(rotation_matrix(2, 30.0), ref_rotation(2, 30.0), atol=1e-15)


# ----------------------------------------------------------------------------- Lemma 1


@pytest.mark.parametrize("d", [2, 3, 5])
@pytest.mark.parametrize("field,angle", [("ot", 0.0), ("rot", 90.0), ("rot", 180.0), ("rot", 37.0)])
def test_lemma1_field_is_the_straight_line_velocity(d, field, angle):
    mu, M = problem(d)
    bmat = ref_map("ot" if field == "ot" else "rotated", mu, M, angle)
    theta, Theta = field_params(field, mu, M, angle)
    x0 = torch.randn(64, d, generator=torch.Generator().manual_seed(d), dtype=F64)
    x1 = mu + x0 @ bmat.T
    bad = singular_times(Theta)
    model = GaussianAffine(d).double().set_field(field, mean=mu, cov=M, angle=angle)  # float64 throughout
    for t in [0.0, 0.1, 0.3, 0.5, 0.7, 0.95, 1.0]:
        if any(abs(t - s) < 0.05 for s in bad):
            continue
        xt = (1 - t) * x0 + t * x1
        tt = torch.full((64,), t, dtype=F64)
        assert torch.allclose(lemma1_field(theta, Theta)(xt, tt), x1 - x0, atol=1e-9)
        assert torch.allclose(model(xt, tt), x1 - x0, atol=1e-9)


def test_rot180_identity_cov_is_singular_at_half():
    theta, Theta = field_params("rot", [0.0, 0.0], torch.eye(2), 180.0)
    assert torch.equal(Theta, -2 * torch.eye(2, dtype=F64))
    assert singular_times(Theta) == [0.5]
    model = GaussianAffine(2, "rot", mean=[0.0, 0.0], cov=1.0, angle=180.0).double()
    with pytest.raises(torch.linalg.LinAlgError):
        model(torch.zeros(3, 2, dtype=F64), torch.full((3,), 0.5, dtype=F64))
    with pytest.raises(SingularFieldError):
        expected_loss("rot", 0.5, GP([0.0, 0.0], torch.eye(2), "rotated", "linear", angle=180.0))
    rows = field_gradvar_table(
        "rot", GP([5.0, 5.0], torch.eye(2), "rotated", "linear", angle=180.0), edges=[0.0, 0.4, 0.6, 1.0], n_t_per_bin=1
    )
    assert rows[1]["n_singular"] == 1 and rows[1]["n_t"] == 0 and math.isnan(rows[1]["grad_var"])
    assert rows[0]["grad_var"] < 1e-20 and rows[2]["loss"] < 1e-20  # memorizing field: zero elsewhere


# ----------------------------------------------------------------------------- exact moments


def exact_by_taylor(model, interp, coupling, mu, M, angle, t):
    """E l, E g and tr Cov g from the exact quadratic expansion of the autograd loss/gradient in xi."""
    d = len(mu)
    params = {k: v.detach() for k, v in model.named_parameters()}
    s = ref_sqrtm(M)
    bmat = None if coupling == "independent" else ref_map(coupling, mu, M, angle)
    tt = torch.tensor([t], dtype=F64)

    def loss(p, xi):
        x0, z1, eps = xi[:d], xi[d : 2 * d], xi[2 * d :]
        x1 = mu + (s @ z1 if bmat is None else bmat @ x0)
        f = lambda x, u: functional_call(model, p, (x, u))
        return per_sample_loss(f, interp(x0[None], x1[None], tt, eps[None]))[0]

    def g(xi):
        gr = grad(loss)(params, xi)
        return torch.cat([gr["theta"].reshape(-1), gr["Theta"].reshape(-1)])

    z = torch.zeros(3 * d, dtype=F64)
    l_h = jacrev(jacrev(lambda xi: loss(params, xi)))(z)
    e_loss = loss(params, z) + 0.5 * torch.trace(l_h)
    g0, gj, gh = g(z), jacrev(g)(z), jacrev(jacrev(g))(z)
    e_g = g0 + 0.5 * torch.diagonal(gh, dim1=1, dim2=2).sum(1)
    var = (gj**2).sum() + 0.5 * (gh**2).sum()
    return e_loss.item(), e_g, var.item()


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("interp_name,sigma", INTERPS)
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_moments_match_exact_quadratic_expansion(d, interp_name, sigma, coupling):
    mu, M = problem(d)
    interp = INTERPOLANTS[interp_name](sigma)
    for kind, t in [("perturbed", 0.37), ("rot", 0.81), ("ot", 0.12), ("shifted", 0.6)]:
        model = make_model(d, kind, mu, M, 90.0, seed=d)
        mo = expected_moments(model, t, GP(mu, M, coupling, interp_name, sigma, 90.0))
        e_loss, e_g, var = exact_by_taylor(model, interp, coupling, mu, M, 90.0, t)
        assert mo["loss"].item() == pytest.approx(e_loss, rel=1e-9, abs=1e-12)
        assert mo["grad_var"].item() == pytest.approx(var, rel=1e-9, abs=1e-12)
        mg = torch.cat([mo["mean_grad_theta"], mo["mean_grad_Theta"].reshape(-1)])
        assert torch.allclose(mg, e_g, rtol=1e-9, atol=1e-12)


def test_mean_gradient_is_gradient_of_expected_loss():
    mu, M = problem(3)
    model = make_model(3, "perturbed", mu, M, 90.0, seed=7)
    theta = model.theta.detach().clone().requires_grad_(True)
    Theta = model.Theta.detach().clone().requires_grad_(True)
    for interp, sigma in INTERPS:
        el = expected_loss((theta, Theta), 0.6, GP(mu, M, "rotated", interp, sigma, 90.0))
        g_theta, g_Theta = torch.autograd.grad(el, (theta, Theta))
        mo = expected_moments(model, 0.6, GP(mu, M, "rotated", interp, sigma, 90.0))
        assert torch.allclose(g_theta, mo["mean_grad_theta"], atol=1e-12)
        assert torch.allclose(g_Theta, mo["mean_grad_Theta"], atol=1e-12)
        assert mo["grad_sqnorm"].item() == pytest.approx(mo["grad_var"].item() + mo["mean_grad_sqnorm"].item())


@pytest.mark.parametrize("d", [2, 5])
@pytest.mark.parametrize("interp_name,sigma", INTERPS)
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_monte_carlo_matches_closed_form(d, interp_name, sigma, coupling):
    mu, M = problem(d)
    interp = INTERPOLANTS[interp_name](sigma)
    n = 20000
    gen = torch.Generator().manual_seed(1000 * d + 10 * COUPLINGS.index(coupling) + len(interp_name))
    for kind, t in [("ot", 0.3), ("rot", 0.7), ("perturbed", 0.55), ("shifted", 0.45)]:
        model = make_model(d, kind, mu, M, 90.0, seed=d + 1)
        x0, x1, eps = sample_pairs(coupling, mu, M, 90.0, n, gen)
        losses, g = per_sample_grads(model, interp, x0, x1, torch.full((n,), t, dtype=F64), eps)
        l_mc, l_se, v_mc, v_se = mc_estimates(losses, g)
        l_cf = expected_loss(model, t, GP(mu, M, coupling, interp_name, sigma, 90.0)).item()
        v_cf = expected_grad_variance(model, t, GP(mu, M, coupling, interp_name, sigma, 90.0)).item()
        exact_zero = sigma == 0.0 and (kind, coupling) in {("ot", "ot"), ("rot", "rotated")}
        if not exact_zero:  # a real comparison: the estimates are well away from zero
            assert l_mc > 10 * l_se and v_mc > 10 * v_se
        assert abs(l_mc - l_cf) <= 4 * l_se + 1e-10 * (1 + l_cf), (kind, t, l_mc, l_cf, l_se)
        assert abs(v_mc - v_cf) <= 4 * v_se + 1e-10 * (1 + v_cf), (kind, t, v_mc, v_cf, v_se)


def test_vmap_per_sample_grads_equal_backward_loop():
    """The MC tool above agrees with plain per-sample backward passes."""
    mu, M = problem(3)
    model = make_model(3, "perturbed", mu, M, 90.0)
    interp = INTERPOLANTS["bridge"](0.3)
    x0, x1, eps = sample_pairs("independent", mu, M, 90.0, 5, torch.Generator().manual_seed(0))
    t = torch.linspace(0.1, 0.9, 5, dtype=F64)
    _, g = per_sample_grads(model, interp, x0, x1, t, eps)
    for i in range(5):
        model.zero_grad()
        per_sample_loss(model, interp(x0[i : i + 1], x1[i : i + 1], t[i : i + 1], eps[i : i + 1])).sum().backward()
        gi = torch.cat([model.theta.grad.reshape(-1), model.Theta.grad.reshape(-1)])
        assert torch.allclose(g[i], gi, atol=1e-12)


# ----------------------------------------------------------------------------- Prop. 1


@pytest.mark.parametrize("d", [2, 3])
def test_prop1_pair_optimal_field_has_zero_loss_and_variance(d):
    mu, M = problem(d)
    for interp in ["linear", "cfm", "bridge"]:  # all coincide at sigma = 0
        for t in [0.05, 0.3, 0.5, 0.77, 0.99]:
            for field, coupling, angle in [("ot", "ot", 180.0), ("rot", "rotated", 90.0), ("rot", "rotated", 180.0)]:
                if any(abs(t - s) < 1e-6 for s in singular_times(field_params(field, mu, M, angle)[1])):
                    continue
                mo = expected_moments(field, t, GP(mu, M, coupling, interp, 0.0, angle))
                assert mo["loss"].item() <= 1e-10 and mo["grad_var"].item() <= 1e-10
                assert mo["grad_sqnorm"].item() <= 1e-10
            # mismatched pairings: clearly positive gradient variance
            assert expected_grad_variance("ot", t, GP(mu, M, "rotated", interp, angle=90.0)).item() > 1e-2
            assert expected_grad_variance("rot", t, GP(mu, M, "ot", interp, angle=90.0)).item() > 1e-2
            assert expected_grad_variance("ot", t, GP(mu, M, "independent", interp)).item() > 1e-2
        # interpolant noise breaks the zero: the pair-optimal field then has positive variance
        if interp != "linear":
            assert expected_grad_variance("rot", 0.4, GP(mu, M, "rotated", interp, 0.05, 90.0)).item() > 1e-6


# ----------------------------------------------------------------------------- per-bin table


def test_table_single_point_equals_midpoint_moments():
    mu, M = problem(2)
    rows = field_gradvar_table("ot", GP(mu, M, "rotated", "cfm", 0.3, 90.0), edges=4, n_t_per_bin=1)
    assert [(r["t_lo"], r["t_hi"]) for r in rows] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    for r in rows:
        mo = expected_moments("ot", (r["t_lo"] + r["t_hi"]) / 2, GP(mu, M, "rotated", "cfm", 0.3, 90.0))
        assert r["loss"] == pytest.approx(mo["loss"].item(), rel=1e-12)
        assert r["grad_var"] == pytest.approx(mo["grad_var"].item(), rel=1e-9)
        assert r["grad_var_fixed_t"] == pytest.approx(mo["grad_var"].item(), rel=1e-12)
        assert r["n_t"] == 1 and r["n_singular"] == 0


def test_table_bin_variance_matches_monte_carlo_with_uniform_t():
    """grad_var of a bin is the variance over samples with t ~ U(bin), as the callback measures it."""
    mu, M = problem(2)
    lo, hi = 0.5, 1.0
    rows = field_gradvar_table("ot", GP(mu, M, "independent", "bridge", 0.3, 90.0), edges=[0.0, lo, hi], n_t_per_bin=64)
    r = rows[1]
    assert r["grad_var"] > r["grad_var_fixed_t"] > 0
    assert r["grad_sqnorm"] == pytest.approx(r["grad_var"] + r["mean_grad_sqnorm"])
    n = 6000
    gen = torch.Generator().manual_seed(11)
    model = make_model(2, "ot", mu, M, 90.0)
    x0, x1, eps = sample_pairs("independent", mu, M, 90.0, n, gen)
    t = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=F64)
    losses, g = per_sample_grads(model, INTERPOLANTS["bridge"](0.3), x0, x1, t, eps)
    l_mc, l_se, v_mc, v_se = mc_estimates(losses, g)
    assert abs(l_mc - r["loss"]) <= 4 * l_se + 1e-3 * r["loss"]
    assert abs(v_mc - r["grad_var"]) <= 4 * v_se + 1e-3 * r["grad_var"]


def test_model_constructor_and_validation():
    m = GaussianAffine(3)
    assert torch.equal(m.theta, torch.zeros(3)) and torch.equal(m.Theta, torch.zeros(3, 3))
    assert m(torch.ones(4, 3), torch.rand(4)).abs().max() == 0
    m.set_field("rot", mean=2.0, cov=[1.0, 2.0, 3.0], angle=90.0)
    theta, Theta = field_params("rot", 2.0, [1.0, 2.0, 3.0], 90.0, dim=3)
    assert torch.allclose(m.theta.double(), theta) and torch.allclose(m.Theta.double(), Theta)
    assert m(torch.ones(4, 3), torch.tensor(0.3)).shape == (4, 3)
    with pytest.raises(ValueError):
        GaussianAffine(2, "nope")
    with pytest.raises(ValueError):
        expected_loss("ot", 0.5, GP([0.0, 0.0], torch.eye(2), "shuffled"))
