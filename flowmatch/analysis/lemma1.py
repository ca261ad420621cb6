"""The paper's Lemma-1 velocity fields as callables, and the numerical checks of Lemma 1 (Reu et al. 2025, Sec. 3).

    v(x, t) = theta + Theta (I + t Theta)^{-1} (x - t theta)

is the straight-line field of the affine coupling x1 = (I + Theta) x0 + theta of x0 ~ N(0, I); the OT and
rotated choices of (theta, Theta) come from :func:`flowmatch.gaussian.field_params`, the evaluation from
:func:`flowmatch.gaussian.affine_velocity`.

Checks (``evaluate.py task=lemma1``), on a seeded random non-isotropic target N(mu, M) (:func:`random_target`):

* :func:`integration_rows`: dopri5 (float64, tight tolerances) through v_OT (Theta = M^{1/2} - I) and the rotated
  field (Theta_R = M^{1/2} R - I) carries x0 to its partner mu + M^{1/2} x0, resp. mu + M^{1/2} R x0.
* :func:`fit_rows`: an MLP regressed onto v_OT keeps an error floor (it cannot represent (I + t Theta)^{-1}
  exactly), the ``gaussian_affine`` model (which contains v_OT) has none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowmatch.analysis.oracle import SingularFieldError
from flowmatch.gaussian import affine_velocity, coupling_map, field_params, singular_times
from flowmatch.models.gaussian_affine import GaussianAffine
from flowmatch.models.mlp import MLP
from flowmatch.sampling import Solver

__all__ = [
    "AffineField",
    "lemma1_field",
    "random_target",
    "integrate_field",
    "integration_rows",
    "line_batch",
    "fit_velocity",
    "fit_errors",
    "fit_rows",
]


@dataclass
class AffineField:
    """The Lemma-1 velocity field with parameters ``theta`` (d,) and ``Theta`` (d, d); callable as v(x, t)."""

    theta: Tensor
    Theta: Tensor

    def __call__(self, x: Tensor, t) -> Tensor:
        return affine_velocity(self.theta, self.Theta, x, t)

    @property
    def dim(self) -> int:
        return self.theta.shape[0]


def lemma1_field(theta, Theta) -> AffineField:
    """The field v(x, t) = theta + Theta (I + t Theta)^{-1} (x - t theta) as a callable ``AffineField``."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    Theta = torch.as_tensor(Theta, dtype=torch.float64)
    if Theta.shape != (theta.shape[0], theta.shape[0]):
        raise ValueError(f"Theta must be {theta.shape[0]}x{theta.shape[0]}, got {tuple(Theta.shape)}")
    return AffineField(theta, Theta)


def random_target(dim: int, seed: int = 0, eig_range=(0.25, 4.0), mean_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Seeded float64 (mu, M) with M = Q diag(lambda) Q^T symmetric positive definite and non-isotropic.

    Q is Haar-random (QR of a Gaussian matrix, column signs fixed by diag R); lambda is log-uniform in
    ``eig_range`` = [lo, hi], with (for dim >= 2) the smallest set to lo and the largest to hi, so the condition
    number of M is exactly hi / lo. mu = ``mean_scale`` * N(0, I_d).
    """
    lo, hi = float(eig_range[0]), float(eig_range[1])
    if not 0 < lo <= hi:
        raise ValueError(f"eig_range must be [lo, hi] with 0 < lo <= hi, got {list(eig_range)}")
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    u = torch.rand(dim, generator=g, dtype=torch.float64)
    if dim >= 2:
        u[u.argmin()], u[u.argmax()] = 0.0, 1.0
    evals = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    cov = (q * evals) @ q.T
    mean = float(mean_scale) * torch.randn(dim, generator=g, dtype=torch.float64)
    return mean, (cov + cov.T) / 2


def integrate_field(field: AffineField, x0: Tensor, atol: float = 1e-10, rtol: float = 1e-10) -> tuple[Tensor, int]:
    """(x_hat1, NFE): dopri5 (:class:`flowmatch.sampling.Solver`) for dx/dt = v(x, t) from t = 0 to 1, in float64.

    Raises :class:`SingularFieldError` when I + t Theta is singular for some t in [0, 1] (the field is undefined
    there: t = -1/lambda for a real eigenvalue lambda <= -1 of Theta) or the linear solve fails on the way.
    """
    times = singular_times(field.Theta)
    if times:
        raise SingularFieldError(f"I + t Theta is singular at t = {times}")
    try:
        out = Solver("dopri5", atol=atol, rtol=rtol).integrate(field, x0.double())
    except torch.linalg.LinAlgError as exc:
        raise SingularFieldError(str(exc).splitlines()[0]) from exc
    return out.x1, out.nfe


def integration_rows(mean, cov, angle: float, n: int, seed: int, atol: float, rtol: float) -> list[dict]:
    """Lemma 1 by integration: one row per field (``ot``, ``rot``) with the mean and max of ||x_hat1 - x1||
    over ``n`` float64 sources x0 ~ N(0, I) (generator ``seed``), x1 = B x0 + b the field's partner
    (:func:`flowmatch.gaussian.coupling_map`: B = M^{1/2}, resp. M^{1/2} R(angle); b = mu). A singular field
    gives a row with NaN errors and ``status`` naming the singular times."""
    d = len(mean)
    x0 = torch.randn(int(n), d, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    rows = []
    for field, coupling in (("ot", "ot"), ("rot", "rotated")):
        b_mat, b = coupling_map(coupling, mean, cov, angle)
        x1 = x0 @ b_mat.T + b
        row = {"dim": d, "field": field, "angle": float(angle) if field == "rot" else 0.0, "n": int(n)}
        try:
            x_hat, nfe = integrate_field(lemma1_field(*field_params(field, mean, cov, angle)), x0, atol, rtol)
        except SingularFieldError as exc:
            rows.append({**row, "err_mean": math.nan, "err_max": math.nan, "rel_err_max": math.nan, "nfe": 0})
            rows[-1]["status"] = f"singular: {exc}"
            continue
        err = (x_hat - x1).norm(dim=1)
        rel = float((err / x1.norm(dim=1)).max())
        rows.append({**row, "err_mean": float(err.mean()), "err_max": float(err.max()), "rel_err_max": rel, "nfe": nfe})
        rows[-1]["status"] = "ok"
    return rows


def line_batch(b_mat: Tensor, b: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, u), float64: x0 ~ N(0, I), x1 = B x0 + b, t ~ U(0, 1), x_t = (1 - t) x0 + t x1, u = x1 - x0.

    By Lemma 1, u = v(x_t, t) for the field of the coupling (B, b) (v_OT for B = M^{1/2}, b = mu): the regression
    target, without the per-sample solve of (I + t Theta)."""
    x0 = torch.randn(n, len(b), generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    x1 = x0 @ b_mat.T + b
    return (1 - t)[:, None] * x0 + t[:, None] * x1, t, x1 - x0


def fit_velocity(
    model: nn.Module, b_mat: Tensor, b: Tensor, steps: int, batch_size: int, lr: float, seed: int
) -> float:
    """Regress ``model`` (float32) onto the field of the coupling x1 = B x0 + b (v_OT for the OT map): ``steps``
    Adam steps (learning rate ``lr``, cosine-annealed to 0) on the mean squared error ||f(x_t, t) - u||^2 of fresh
    batches from :func:`line_batch` (generator ``seed``). Returns the mean loss of the last 10% of the steps."""
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(steps), 1))
    model.float().train()
    tail = []
    for step in range(int(steps)):
        x_t, t, u = line_batch(b_mat, b, int(batch_size), g)
        loss = ((model(x_t.float(), t.float()) - u.float()) ** 2).sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= 0.9 * steps:
            tail.append(loss.item())
    return sum(tail) / max(len(tail), 1)


@torch.no_grad()
def fit_errors(
    model: nn.Module, field: AffineField, b_mat: Tensor, b: Tensor, n_test: int, seed: int, atol: float, rtol: float
) -> dict:
    """Held-out errors of a fitted field f (evaluated in float64): the relative error
    E||f(x_t, t) - v(x_t, t)||^2 / E||v(x_t, t)||^2 on ``n_test`` fresh (x_t, t) (generator ``seed``; v = ``field``
    evaluated in closed form), and the
    endpoint errors ||x_hat1 - T(x0)|| (mean, max) with x_hat1 = dopri5 through f from those x0, T(x0) = B x0 + b."""
    model.double().eval()
    g = torch.Generator().manual_seed(int(seed))
    x0 = torch.randn(int(n_test), len(b), generator=g, dtype=torch.float64)
    x_t, t, _ = line_batch(b_mat, b, int(n_test), g)
    v = field(x_t, t)
    rel = float(((model(x_t, t) - v) ** 2).sum() / (v**2).sum())
    out = Solver("dopri5", atol=atol, rtol=rtol).integrate(model, x0)
    err = (out.x1 - (x0 @ b_mat.T + b)).norm(dim=1)
    return {
        "rel_err": rel,
        "endpoint_err_mean": float(err.mean()),
        "endpoint_err_max": float(err.max()),
        "nfe": out.nfe,
    }


def fit_rows(
    mean,
    cov,
    widths: Sequence[int],
    depth: int,
    steps: int,
    batch_size: int,
    lr: float,
    affine_lr: float,
    n_test: int,
    seed: int,
    atol: float,
    rtol: float,
    progress=None,
) -> list[dict]:
    """The fit error against width: one row per MLP width (``flowmatch.models.mlp.MLP(d, width, depth)``) and one
    for ``gaussian_affine`` (starting at v = 0, learning rate ``affine_lr``), each fitted to v_OT by
    :func:`fit_velocity` and scored by :func:`fit_errors`. Every model sees the same batches (stream ``seed``) and
    the same held-out set (``seed + 1``); initial weights come from ``torch.manual_seed(seed)``.
    ``progress(row)`` is called after each fit."""
    d = len(mean)
    field = lemma1_field(*field_params("ot", mean, cov))
    b_mat, b = coupling_map("ot", mean, cov)
    specs = [("mlp", int(w), lr) for w in widths] + [("gaussian_affine", None, affine_lr)]
    rows = []
    for name, width, rate in specs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = MLP(d, width=width, depth=int(depth)) if name == "mlp" else GaussianAffine(d)
        train_loss = fit_velocity(model, b_mat, b, steps, batch_size, rate, seed)
        row = {"dim": d, "model": name, "width": width if width is not None else "", "depth": depth if width else ""}
        row.update(params=sum(p.numel() for p in model.parameters()), steps=int(steps), lr=rate, train_loss=train_loss)
        row.update(fit_errors(model, field, b_mat, b, n_test, int(seed) + 1, atol, rtol))
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows
