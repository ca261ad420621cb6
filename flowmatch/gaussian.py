"""Gaussian geometry, in float64: PSD square roots, moments from config values, rotations, the W2-optimal map
between Gaussians and the Bures W2 distance, and the straight-line (Lemma-1) fields of affine couplings.

Couplings, metrics, data, models and the closed-form analysis (``flowmatch.analysis``) all import these; this
module imports nothing of flowmatch.

Setting of the paper's Gaussian analysis (Reu et al. 2025, Sec. 3): source x0 ~ N(0, I_d), target
x1 ~ N(mu, M). An affine map x1 = B x0 + b sends every straight line x_t = (1 - t) x0 + t x1 through

    x_t = (I + t Theta) x0 + t theta,     theta = b,  Theta = B - I,

so the velocity that transports along those lines is (Lemma 1)

    v(x, t) = theta + Theta (I + t Theta)^{-1} (x - t theta).                              (*)

* ``ot``  : B = M^{1/2} (the W2-optimal map from N(0, I)), theta = mu,  Theta = M^{1/2} - I.
* ``rot`` : B = M^{1/2} R (a rotated coupling, x1 = mu + M^{1/2} R x0), Theta_R = M^{1/2} R - I.

(*) is defined wherever I + t Theta is invertible. For Theta with a real eigenvalue lambda <= -1 it is
singular at t = -1/lambda: all lines of that eigen-direction cross there. The 180-degree rotation with
M = I gives Theta_R = -2 I, and every line meets at t = 1/2, where the field is undefined (a linear
solve raises ``torch.linalg.LinAlgError``). ``singular_times`` lists those times.

Rotations (``rotation_matrix``): in d dimensions the consecutive coordinate planes (0, 1), (2, 3), ...
are each rotated by the same angle; with d odd the last coordinate is left unrotated. Multiples of 90
degrees use exact cosines/sines so that e.g. 180 degrees gives exactly -1 on the rotated planes.

Functions accept tensors, arrays, lists or (for config values) a scalar mean (``mean * 1``) and a scalar /
per-coordinate / full covariance (as ``data.cov``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "sqrtm_psd",
    "as_cov_matrix",
    "as_mean",
    "mean_cov",
    "gaussian_ot_map",
    "gaussian_w2",
    "rotation_matrix",
    "coupling_map",
    "affine_velocity",
    "field_params",
    "singular_times",
]


def sqrtm_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigendecomposition in float64,
    of the symmetrised (A + A^T)/2; negative rounding-level eigenvalues clamped to 0)."""
    a64 = a.double()
    evals, evecs = torch.linalg.eigh((a64 + a64.T) / 2)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    return root.to(a.dtype)


def as_cov_matrix(cov, dim: int) -> Tensor:
    """Covariance from config: a scalar c (c I), a list of d variances (diagonal) or a d x d matrix."""
    c = torch.as_tensor(cov, dtype=torch.float64)
    if c.dim() == 0:
        return c * torch.eye(dim, dtype=torch.float64)
    if c.dim() == 1 and c.shape[0] == dim:
        return torch.diag(c)
    if c.shape == (dim, dim):
        if not torch.allclose(c, c.T):
            raise ValueError("data.cov must be symmetric")
        return c
    raise ValueError(
        f"data.cov must be a scalar, a list of {dim} variances or a {dim}x{dim} matrix, got shape {tuple(c.shape)}"
    )


def as_mean(mean, dim: int) -> Tensor:
    """Float64 mean (dim,) from config: a scalar (times the all-ones vector) or a list of ``dim`` numbers."""
    m = torch.as_tensor(mean, dtype=torch.float64)
    if m.dim() == 0:
        return m * torch.ones(dim, dtype=torch.float64)
    if m.shape != (dim,):
        raise ValueError(f"data.mean must be a scalar or a list of {dim} numbers, got shape {tuple(m.shape)}")
    return m


def _out_dtype(*xs) -> torch.dtype:
    """Promoted dtype of the floating torch tensors among ``xs`` (float64 when there are none)."""
    dts = [x.dtype for x in xs if isinstance(x, Tensor) and x.is_floating_point()]
    if not dts:
        return torch.float64
    out = dts[0]
    for dt in dts[1:]:
        out = torch.promote_types(out, dt)
    return out


def mean_cov(mean, cov, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Float64 (mean (d,), cov (d, d)) from config-like values.

    ``mean``: scalar (times the all-ones vector) or length-d vector; ``cov``: scalar (c I), length-d
    variances or a d x d matrix. ``dim`` is needed only when both are scalars. ``None`` means 0 / I.
    """
    m = None if mean is None else torch.as_tensor(mean).to(torch.float64)
    c = None if cov is None else torch.as_tensor(cov).to(torch.float64)
    if dim is None:
        if m is not None and m.dim() == 1:
            dim = m.shape[0]
        elif c is not None and c.dim() >= 1:
            dim = c.shape[0]
        else:
            raise ValueError("dim is required when both mean and cov are scalars (or None)")
    dim = int(dim)
    if m is None:
        m = torch.zeros(dim, dtype=torch.float64)
    elif m.dim() == 0:
        m = m * torch.ones(dim, dtype=torch.float64)
    elif m.shape != (dim,):
        raise ValueError(f"mean must be a scalar or a vector of length {dim}, got shape {tuple(m.shape)}")
    c = torch.eye(dim, dtype=torch.float64) if c is None else as_cov_matrix(c, dim).to(torch.float64)
    return m, c


def _eigh_sym(a: Tensor) -> tuple[Tensor, Tensor]:
    return torch.linalg.eigh((a + a.T) / 2)


def gaussian_ot_map(mean0, cov0, mean1, cov1) -> tuple[Tensor, Tensor]:
    """(A, b) with T(x) = A x + b the W2-optimal (Monge) map from N(mean0, cov0) to N(mean1, cov1).

    A = S0^{-1/2} (S0^{1/2} S1 S0^{1/2})^{1/2} S0^{-1/2} (symmetric PSD), b = mean1 - A mean0.
    ``cov0`` must be positive definite (``cov1`` may be singular). Computed in float64 and returned in
    the promoted dtype of the floating tensor arguments (float64 if there are none).
    """
    dtype = _out_dtype(mean0, cov0, mean1, cov1)
    m0, s0 = mean_cov(mean0, cov0)
    m1, s1 = mean_cov(mean1, cov1, dim=m0.shape[0])
    evals, evecs = _eigh_sym(s0)
    if evals.min() <= 1e-12 * max(float(evals.abs().max()), 1e-300):
        raise ValueError("gaussian_ot_map: cov0 must be positive definite")
    s0_half = (evecs * evals.sqrt()) @ evecs.T
    s0_ihalf = (evecs * evals.rsqrt()) @ evecs.T
    mid = sqrtm_psd(s0_half @ s1 @ s0_half)
    a = s0_ihalf @ mid @ s0_ihalf
    a = (a + a.T) / 2
    b = m1 - a @ m0
    return a.to(dtype), b.to(dtype)


def gaussian_w2(mean0, cov0, mean1, cov1, squared: bool = False) -> Tensor:
    """Wasserstein-2 distance between N(mean0, cov0) and N(mean1, cov1) (0-dim tensor).

    W2^2 = ||m0 - m1||^2 + tr S0 + tr S1 - 2 tr (S1^{1/2} S0 S1^{1/2})^{1/2}  (the Bures metric on the
    covariances). Returns W2, or W2^2 with ``squared=True``; PSD covariances (singular allowed).
    """
    dtype = _out_dtype(mean0, cov0, mean1, cov1)
    m0, s0 = mean_cov(mean0, cov0)
    m1, s1 = mean_cov(mean1, cov1, dim=m0.shape[0])
    s1_half = sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(s1_half @ s0 @ s1_half).clamp_min(0).sqrt().sum()
    w2sq = ((m0 - m1) ** 2).sum() + torch.trace(s0) + torch.trace(s1) - 2 * cross
    w2sq = w2sq.clamp_min(0)
    return (w2sq if squared else w2sq.sqrt()).to(dtype)


def _cos_sin(angle_deg: float) -> tuple[float, float]:
    a = float(angle_deg) % 360.0
    exact = {0.0: (1.0, 0.0), 90.0: (0.0, 1.0), 180.0: (-1.0, 0.0), 270.0: (0.0, -1.0)}
    if a in exact:
        return exact[a]
    r = math.radians(a)
    return math.cos(r), math.sin(r)


def rotation_matrix(dim: int, angle_deg: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """Block-diagonal rotation: planes (0,1), (2,3), ... each rotated by ``angle_deg`` degrees
    (counter-clockwise, [[cos, -sin], [sin, cos]]); with ``dim`` odd the last coordinate is fixed."""
    dim = int(dim)
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    c, s = _cos_sin(angle_deg)
    r = torch.eye(dim, dtype=dtype)
    for i in range(0, dim - 1, 2):
        r[i, i], r[i, i + 1], r[i + 1, i], r[i + 1, i + 1] = c, -s, s, c
    return r


def coupling_map(coupling: str, mean, cov, angle: float = 180.0, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """(B, b) with x1 = B x0 + b for the deterministic couplings of x0 ~ N(0, I) to N(mean, cov).

    ``ot``: the Gaussian OT map (B = cov^{1/2}, b = mean); ``rotated``: B = cov^{1/2} R(angle), b = mean.
    """
    m, c = mean_cov(mean, cov, dim)
    d = m.shape[0]
    if coupling == "ot":
        return gaussian_ot_map(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64), m, c)
    if coupling == "rotated":
        return sqrtm_psd(c) @ rotation_matrix(d, angle), m
    raise ValueError(f"coupling_map: coupling must be 'ot' or 'rotated', got {coupling!r}")


def affine_velocity(theta: Tensor, Theta: Tensor, x: Tensor, t) -> Tensor:
    """v(x, t) = theta + Theta (I + t Theta)^{-1} (x - t theta) for x (B, d) and t (B,) or a scalar.

    Raises ``torch.linalg.LinAlgError`` where I + t Theta is exactly singular (field undefined).
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    t = t.reshape(-1).to(x.dtype)
    theta = theta.to(x.dtype)
    Theta = Theta.to(x.dtype)
    eye = torch.eye(Theta.shape[0], dtype=x.dtype, device=x.device)
    mats = eye + t[:, None, None] * Theta
    rhs = x - t[:, None] * theta
    y = torch.linalg.solve(mats, rhs.unsqueeze(-1)).squeeze(-1)
    return theta + y @ Theta.T


def field_params(field: str, mean, cov, angle: float = 180.0, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """(theta, Theta) of the Lemma-1 field: ``ot`` (Theta = M^{1/2} - I) or ``rot``
    (Theta_R = M^{1/2} R(angle) - I); theta = mean in both cases. Float64."""
    names = {"ot": "ot", "rot": "rotated", "rotated": "rotated"}
    if field not in names:
        raise ValueError(f"field must be 'ot' or 'rot', got {field!r}")
    b_mat, b = coupling_map(names[field], mean, cov, angle, dim)
    return b.clone(), b_mat - torch.eye(b_mat.shape[0], dtype=b_mat.dtype)


def singular_times(Theta, lo: float = 0.0, hi: float = 1.0, tol: float = 1e-9) -> list[float]:
    """Sorted times t in [lo, hi] where I + t Theta is singular (t = -1/lambda for real eigenvalues
    lambda of Theta); the Lemma-1 field is undefined there."""
    evals = torch.linalg.eigvals(torch.as_tensor(Theta, dtype=torch.float64))
    out = set()
    for lam in evals.tolist():
        if abs(lam.imag) <= tol * max(1.0, abs(lam)) and lam.real < 0:
            t = -1.0 / lam.real
            if lo - tol <= t <= hi + tol:
                out.add(round(t, 12))
    return sorted(out)
