"""Lemma 2: what one ReFlow step does to a rotated Gaussian coupling, in closed form, and the rotation a set of
generated pairs realises.

Coupling: x0 ~ N(0, I), x1 = mu + R x0 with R a rotation by ``angle`` in the plane (0, 1); interpolant
CFM(sigma): x_t = (1 - t) x0 + t x1 + sigma eps, u = x1 - x0. The population minimiser of the flow-matching loss
is v(x, t) = E[u | x_t = x], Gaussian regression: with y = x - t mu, R = c I + s J (c = cos, s = sin of the angle,
J the rotation by 90 degrees),

    v(x, t) = mu + [(1 - c)(2t - 1) I + s J] y / s_t,    s_t = (1 - t)^2 + t^2 + 2 t (1 - t) c + sigma^2,

(Cov(u, x_t) = (R - I)((1 - t) I + t R)^T, Cov(x_t) = s_t I). I and J commute, so the flow map from t = 0 to 1
is x0 -> mu + exp(int_0^1 (1 - c)(2t - 1) / s_t dt) R(Theta) x0: the radial integral vanishes (s_t is symmetric
under t -> 1 - t, 2t - 1 antisymmetric) and the ReFlow output coupling is the rotation by

    Theta(sigma) = int_0^1 s / s_t dt.

At sigma = 0 and angle < 180 degrees, Theta = angle: the coupling is returned unchanged (Lemma 2). At 180
degrees s = 0: Theta = 0 (the OT map x0 + mu) for every sigma > 0; at sigma = 0 the field is singular at t = 1/2
(all lines meet there) and Theta is undefined (NaN here).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.integrate import quad

__all__ = ["reflow_rotation_angle", "fitted_rotation"]


def reflow_rotation_angle(angle_deg: float, sigma: float) -> float:
    """Theta(sigma) in degrees: the rotation of the population ReFlow output of the ``angle_deg`` rotated coupling
    under CFM(``sigma``) (module docstring); NaN where the field is singular (angle 180 mod 360, sigma = 0)."""
    th = math.radians(angle_deg)
    c, s = math.cos(th), math.sin(th)
    if sigma == 0 and abs(1 + c) < 1e-12:
        return float("nan")

    def s_t(t: float) -> float:
        return (1 - t) ** 2 + t**2 + 2 * t * (1 - t) * c + sigma**2

    value, _ = quad(lambda t: s / s_t(t), 0.0, 1.0, limit=200, epsabs=1e-12, epsrel=1e-12)
    return math.degrees(value)


def fitted_rotation(x0: np.ndarray, x1: np.ndarray) -> dict[str, float]:
    """The affine map x1 ~ A x0 + b fitted by least squares (first two coordinates), written as A = Q S (polar
    decomposition): the rotation angle of Q in degrees in (-180, 180], the singular values of A (radial scales),
    and the RMS residual of the fit."""
    a0, a1 = np.asarray(x0, dtype=np.float64)[:, :2], np.asarray(x1, dtype=np.float64)[:, :2]
    design = np.hstack([a0, np.ones((len(a0), 1))])
    coef, *_ = np.linalg.lstsq(design, a1, rcond=None)
    a = coef[:2].T  # x1 = a @ x0 + b
    u, svals, vt = np.linalg.svd(a)
    q = u @ vt
    resid = a1 - design @ coef
    return {
        "angle_deg": math.degrees(math.atan2(q[1, 0], q[0, 0])),
        "scale_min": float(svals.min()),
        "scale_max": float(svals.max()),
        "det_sign": float(np.sign(np.linalg.det(a))),
        "rms_residual": float(np.sqrt((resid**2).sum(1).mean())),
    }
