"""Exact (sampling-free) loss and gradient-variance moments for the Gaussian affine model.

Model (``flowmatch.models.GaussianAffine``): v(x, t) = theta + Theta (I + t Theta)^{-1} (x - t theta),
parameters phi = (theta in R^d, Theta in R^{d x d}). Data: x0 ~ N(0, I_d), x1 ~ N(mu, M), eps ~ N(0, I_d).

Couplings: ``independent`` (x0, x1, eps independent), ``ot`` (x1 = T_OT(x0) = M^{1/2} x0 + mu) and
``rotated`` (x1 = mu + M^{1/2} R(angle) x0). In every case (x0, x1, eps) = L xi + m with xi ~ N(0, I_{3d});
interpolants (``linear``, ``cfm``, ``bridge``; see ``flowmatch.interpolants``) give x_t = P xi + p and
u_t = Q xi + q. With W = (I + t Theta)^{-1} and K = Theta W one has v(x, t) = W theta + K x, hence the
residual is affine in xi:

    r = v(x_t, t) - u_t = A xi + c,      A = K P - Q,   c = K p + W theta - q.

Per-sample loss l = ||r||^2 / d (the mean over dimensions of ``flowmatch.losses.per_sample_loss``), so
E[l] = (||A||_F^2 + ||c||^2) / d. Derivatives (dW = -t W dTheta W, dK = W dTheta W):

    d r / d theta_a     = w_a                                  (w_a = column a of W)
    d r / d Theta_ab    = w_a (f_b . xi + h_b),    F = W P (rows f_b),  h = W (p - t theta).

Each gradient coordinate is therefore (2/d) times a product of two jointly Gaussian scalars:
g_theta_a = (2/d) Y_a and g_Theta_ab = (2/d) X_b Y_a with Y_a = alpha_a . xi + beta_a (alpha_a = A^T w_a,
beta = W^T c) and X_b = f_b . xi + h_b. With Var(XY) = s_x^2 s_y^2 + s_xy^2 + mx^2 s_y^2 + my^2 s_x^2
+ 2 mx my s_xy (Isserlis) and G = W^T A F^T (G_ab = alpha_a . f_b), summing over coordinates:

    tr Cov[g] = (4/d^2) [ ||W^T A||^2 (||F||^2 + 1 + ||h||^2) + ||G||^2 + ||beta||^2 ||F||^2
                          + 2 beta^T G h ],
    E[g_theta] = (2/d) beta,     E[g_Theta] = (2/d) (G + beta h^T).

All quantities are exact at fixed t (float64, differentiable in (theta, Theta) by autograd).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field

import torch
from torch import Tensor

from flowmatch.gaussian import coupling_map, field_params, mean_cov, sqrtm_psd
from flowmatch.gradvar import bin_edges
from flowmatch.interpolants import INTERPOLANTS, Interpolant, Linear

__all__ = [
    "CLOSED_FORM_COUPLINGS",
    "GaussianProblem",
    "Residual",
    "residual_coefficients",
    "expected_moments",
    "expected_loss",
    "expected_grad_variance",
    "field_gradvar_table",
    "SingularFieldError",
]

# the couplings of flowmatch.couplings.COUPLINGS that have closed-form moments here
CLOSED_FORM_COUPLINGS = ("independent", "ot", "rotated")


class SingularFieldError(ValueError):
    """I + t Theta is singular at the requested t: the affine field is undefined there."""


@dataclass(frozen=True)
class GaussianProblem:
    """The setting of the closed form: source N(0, I_d), target N(``mean``, ``cov``) (float64), pairs from
    ``coupling`` (independent | ot | rotated by ``angle`` degrees) and x_t, u_t from ``interpolant`` (an
    object of the ``interpolant`` config group). Build it from config-like values with :meth:`of`."""

    mean: Tensor
    cov: Tensor
    coupling: str = "independent"
    interpolant: Interpolant = dc_field(default_factory=Linear)
    angle: float = 180.0

    def __post_init__(self) -> None:
        if self.coupling not in CLOSED_FORM_COUPLINGS:
            raise ValueError(
                f"coupling must be one of {list(CLOSED_FORM_COUPLINGS)} for the closed form, got {self.coupling!r}"
            )

    @classmethod
    def of(
        cls,
        mean=None,
        cov=None,
        coupling: str = "independent",
        interpolant: Interpolant | str = "linear",
        sigma: float = 0.0,
        angle: float = 180.0,
        dim: int | None = None,
    ) -> GaussianProblem:
        """From a scalar / vector ``mean``, a scalar / variances / matrix ``cov`` (see
        :func:`flowmatch.gaussian.mean_cov`) and an interpolant object or name (with ``sigma``)."""
        if isinstance(interpolant, str):
            if interpolant not in INTERPOLANTS:
                raise ValueError(f"interpolant must be one of {sorted(INTERPOLANTS)}, got {interpolant!r}")
            interpolant = INTERPOLANTS[interpolant](sigma)
        m, c = mean_cov(mean, cov, dim)
        return cls(m, c, coupling, interpolant, float(angle))

    @property
    def dim(self) -> int:
        return self.mean.shape[0]


@dataclass(frozen=True)
class Residual:
    """The affine pieces at time ``t``: r = A xi + c with xi ~ N(0, I_{3d}) (xi = (x0, z1, eps) blocks),
    W = (I + t Theta)^{-1}, x_t = P xi + p, and the field's (theta, Theta)."""

    A: Tensor
    c: Tensor
    W: Tensor
    P: Tensor
    p: Tensor
    theta: Tensor
    Theta: Tensor
    t: float


def _params(model, problem: GaussianProblem) -> tuple[Tensor, Tensor]:
    """(theta, Theta) in float64 from a GaussianAffine-like module, a (theta, Theta) pair or a field name
    (the Lemma-1 field of the problem's target, rotated fields by its angle)."""
    if isinstance(model, str):
        return field_params(model, problem.mean, problem.cov, problem.angle)
    if hasattr(model, "theta") and hasattr(model, "Theta"):
        theta, Theta = model.theta, model.Theta
    else:
        theta, Theta = model
    return torch.as_tensor(theta).to(torch.float64), torch.as_tensor(Theta).to(torch.float64)


def residual_coefficients(model, t: float, problem: GaussianProblem) -> Residual:
    """The :class:`Residual` of ``model`` (a ``GaussianAffine``, a (theta, Theta) pair or a field name) at time
    ``t`` of ``problem``. Raises ``SingularFieldError`` when I + t Theta is singular."""
    theta, Theta = _params(model, problem)
    d = theta.shape[0]
    mu, m_cov, interp = problem.mean, problem.cov, problem.interpolant
    t = float(t)
    tt = torch.tensor([t], dtype=torch.float64)
    gam, dgam = float(interp.gamma(tt)[0]), float(interp.dgamma(tt)[0])

    eye, zero = torch.eye(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    x0 = torch.cat([eye, zero, zero], 1)
    eps = torch.cat([zero, zero, eye], 1)
    if problem.coupling == "independent":
        x1, b = torch.cat([zero, sqrtm_psd(m_cov), zero], 1), mu
    else:
        bmat, b = coupling_map(problem.coupling, mu, m_cov, problem.angle)
        x1 = torch.cat([bmat, zero, zero], 1)
    P = (1 - t) * x0 + t * x1 + gam * eps
    p = t * b
    Q = x1 - x0 + dgam * eps
    q = b

    mat = eye + t * Theta
    sv = torch.linalg.svdvals(mat.detach())
    if sv.min() <= 1e-13 * max(float(sv.max()), 1.0):
        raise SingularFieldError(f"I + t Theta is singular at t={t}: the field is undefined there")
    W = torch.linalg.inv(mat)
    K = Theta @ W
    A = K @ P - Q
    c = K @ p + W @ theta - q
    return Residual(A, c, W, P, p, theta, Theta, t)


def expected_moments(model, t: float, problem: GaussianProblem) -> dict:
    """Exact moments at fixed ``t`` of the per-sample loss l and its gradient g = dl/d(theta, Theta).

    ``model``: a ``GaussianAffine`` (or anything with ``.theta``/``.Theta``), a pair ``(theta, Theta)``,
    or a field name ``"ot"`` / ``"rot"`` (the Lemma-1 field of the problem's target and angle).

    Returns 0-dim float64 tensors ``loss`` = E[l], ``grad_var`` = tr Cov[g], ``grad_sqnorm`` = E||g||^2,
    ``mean_grad_sqnorm`` = ||E g||^2, and the mean gradient ``mean_grad_theta`` (d,), ``mean_grad_Theta``
    (d, d). Raises ``SingularFieldError`` where I + t Theta is singular.
    """
    co = residual_coefficients(model, t, problem)
    A, c, W, P, p, theta = co.A, co.c, co.W, co.P, co.p, co.theta
    d = theta.shape[0]
    F = W @ P
    h = W @ (p - co.t * theta)
    wta = W.T @ A
    beta = W.T @ c
    G = wta @ F.T
    f2, a2 = (F**2).sum(), (wta**2).sum()
    loss = ((A**2).sum() + (c**2).sum()) / d
    var = (4.0 / d**2) * (a2 * (f2 + 1 + (h**2).sum()) + (G**2).sum() + (beta**2).sum() * f2 + 2 * beta @ G @ h)
    mg_theta = (2.0 / d) * beta
    mg_Theta = (2.0 / d) * (G + torch.outer(beta, h))
    mean_sq = (mg_theta**2).sum() + (mg_Theta**2).sum()
    return {
        "loss": loss,
        "grad_var": var,
        "grad_sqnorm": var + mean_sq,
        "mean_grad_sqnorm": mean_sq,
        "mean_grad_theta": mg_theta,
        "mean_grad_Theta": mg_Theta,
    }


def expected_loss(model, t: float, problem: GaussianProblem) -> Tensor:
    """E[l] = (||A||_F^2 + ||c||^2) / d at fixed t (0-dim float64 tensor); arguments as in ``expected_moments``."""
    co = residual_coefficients(model, t, problem)
    return ((co.A**2).sum() + (co.c**2).sum()) / co.c.shape[0]


def expected_grad_variance(model, t: float, problem: GaussianProblem) -> Tensor:
    """tr Cov[d l / d(theta, Theta)] at fixed t (0-dim float64 tensor); arguments as in ``expected_moments``."""
    return expected_moments(model, t, problem)["grad_var"]


def field_gradvar_table(
    field, problem: GaussianProblem, edges: int | Sequence[float] = 10, n_t_per_bin: int = 16
) -> list[dict]:
    """Per-time-bin exact moments of the per-sample loss and gradient for a fixed affine field.

    ``field``: ``"ot"`` | ``"rot"`` (the Lemma-1 field of the problem's target; ``rot`` by the problem's
    angle), a ``GaussianAffine`` or a ``(theta, Theta)`` pair. ``edges``: a number of equal bins on [0, 1]
    or the bin edges.

    Inside a bin [t_lo, t_hi) t is taken uniform, approximated by the midpoint rule on ``n_t_per_bin``
    equally spaced points t_j = t_lo + (j + 1/2)(t_hi - t_lo)/n (never the bin edges). One dict per bin:

    * ``t_lo``, ``t_hi``; ``n_t`` points used and ``n_singular`` points skipped because I + t Theta is
      singular there (the field is undefined; e.g. the 180-degree ``rot`` field with cov = I at t = 1/2);
    * ``loss`` = avg_t E[l | t];
    * ``grad_sqnorm`` = avg_t E[||g||^2 | t]; ``mean_grad_sqnorm`` = ||avg_t E[g | t]||^2;
    * ``grad_var`` = grad_sqnorm - mean_grad_sqnorm: tr Cov[g] of the samples in the bin with t ~ U(bin),
      i.e. the quantity that the gradient-variance callback writes in ``gradvar.csv``;
    * ``grad_var_fixed_t`` = avg_t tr Cov[g | t] (the conditional variance averaged over t; <= grad_var).

    Values are NaN for a bin whose points are all singular. Near a singular time, or for the bridge near
    t = 0 or 1 (u_t diverges like 1/sqrt(t(1 - t)), so E[l] is not integrable there), the bin averages
    are quadrature values of divergent integrals: they grow with ``n_t_per_bin``.
    """
    n = int(n_t_per_bin)
    if n < 1:
        raise ValueError(f"n_t_per_bin must be >= 1, got {n}")
    e = bin_edges(edges).tolist()
    if isinstance(field, str):
        field = _params(field, problem)
    rows = []
    with torch.no_grad():
        for lo, hi in zip(e, e[1:]):
            acc = {"loss": 0.0, "grad_sqnorm": 0.0, "grad_var_fixed_t": 0.0}
            mg_theta = mg_Theta = 0.0
            used = singular = 0
            for j in range(n):
                t = lo + (j + 0.5) * (hi - lo) / n
                try:
                    mo = expected_moments(field, t, problem)
                except SingularFieldError:
                    singular += 1
                    continue
                used += 1
                acc["loss"] += float(mo["loss"])
                acc["grad_sqnorm"] += float(mo["grad_sqnorm"])
                acc["grad_var_fixed_t"] += float(mo["grad_var"])
                mg_theta = mg_theta + mo["mean_grad_theta"]
                mg_Theta = mg_Theta + mo["mean_grad_Theta"]
            row = {"t_lo": lo, "t_hi": hi, "n_t": used, "n_singular": singular}
            if used:
                mean_sq = float(((mg_theta / used) ** 2).sum() + ((mg_Theta / used) ** 2).sum())
                sq = acc["grad_sqnorm"] / used
                row.update(
                    loss=acc["loss"] / used,
                    grad_var=sq - mean_sq,
                    grad_sqnorm=sq,
                    mean_grad_sqnorm=mean_sq,
                    grad_var_fixed_t=acc["grad_var_fixed_t"] / used,
                )
            else:
                row.update(
                    {k: math.nan for k in ("loss", "grad_var", "grad_sqnorm", "mean_grad_sqnorm", "grad_var_fixed_t")}
                )
            rows.append(row)
    return rows
