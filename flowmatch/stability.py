"""Sampling stability of a learned flow dx/dt = v(x, t) on [0, 1]: discretization error and sensitivity (plain torch).

The paper's "asymmetry in sampling stability" between forward (noise -> data) and backward (data -> noise)
flows, as two measured curves. Phi_{s->t} is the flow map of the ODE from time s to time t.

1. **Endpoint error against the number of steps.** The reference endpoint x1_ref = Phi_{0->1}(x0) is dopri5 at
   a tight tolerance; a fixed-grid solver with K steps gives x1_K and

       err(K) = (1/n) sum_i ||x1_K(x0_i) - x1_ref(x0_i)||,      rel_err(K) = err(K) / ((1/n) sum_i ||x1_ref_i - x0_i||)

   (the error relative to the mean transport length; also the max over i).

2. **Sensitivity to a perturbation injected at time t.** Along the reference trajectory x_t = Phi_{0->t}(x0),
   the state is moved by eps along m unit directions d_ij (||d_ij|| = 1, i.i.d. uniform on the sphere) and
   integrated to 1:

       r_ij(t) = ||Phi_{t->1}(x_t,i + eps d_ij) - Phi_{t->1}(x_t,i)|| / eps,

   the amplification ||dx1|| / ||dx_t|| of one direction; the figure reports its mean over directions and sources.
   For eps -> 0, r_ij(t) -> ||J_{t->1}(x_t,i) d_ij||, J the Jacobian of the flow map; for an affine field
   v(x, t) = A x + b it is exactly ||expm(A (1 - t)) d_ij|| for every eps. The unperturbed state and its m
   perturbations are integrated in one batch, so an adaptive solver takes the same steps for all of them and its
   error largely cancels in the difference.

Everything runs in the dtype of ``x0`` (float64 recommended: the difference of two endpoints is small).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flowmatch.sampling import FIXED_GRID, Solver

__all__ = [
    "Velocity",
    "reference_solver",
    "endpoint_errors",
    "unit_directions",
    "states_at",
    "Sensitivity",
    "perturbation_sensitivity",
    "stability_rows",
]

Velocity = Callable[[Tensor, Tensor], Tensor]


def reference_solver(atol: float = 1e-8, rtol: float = 1e-8) -> Solver:
    """dopri5 at tolerance ``atol`` / ``rtol``: the reference integration of both measurements."""
    return Solver("dopri5", atol=atol, rtol=rtol)


def _norms(x: Tensor) -> Tensor:
    """Euclidean norm of each sample of a batch (B, ...) -> (B,)."""
    return x.flatten(1).norm(dim=1)


def endpoint_errors(
    velocity: Velocity,
    x0: Tensor,
    x1_ref: Tensor,
    methods: Sequence[str] = ("euler",),
    steps: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
) -> list[dict]:
    """err(K), rel_err(K) and max_i ||x1_K - x1_ref|| (module docstring, 1.) for each fixed-grid ``method`` and
    step count K of ``steps``; one row per (method, K): method, steps, nfe, err_mean, err_std, err_max,
    rel_err, transport (the mean transport length (1/n) sum_i ||x1_ref_i - x0_i||)."""
    bad = [m for m in methods if m not in FIXED_GRID]
    if bad:
        raise ValueError(f"stability.methods must be fixed-grid solvers {list(FIXED_GRID)}, got {bad}")
    if x1_ref.shape != x0.shape:
        raise ValueError(f"x1_ref has shape {tuple(x1_ref.shape)}, x0 {tuple(x0.shape)}: they must match")
    transport = float(_norms(x1_ref - x0).mean())
    rows = []
    for method in methods:
        for k in steps:
            res = Solver(method, steps=int(k)).integrate(velocity, x0)
            err = _norms(res.x1 - x1_ref)
            rows.append(
                {
                    "method": method,
                    "steps": int(k),
                    "nfe": res.nfe,
                    "err_mean": float(err.mean()),
                    "err_std": float(err.std()) if len(err) > 1 else 0.0,
                    "err_max": float(err.max()),
                    "rel_err": float(err.mean()) / transport if transport > 0 else math.nan,
                    "transport": transport,
                }
            )
    return rows


def unit_directions(n: int, m: int, shape: Sequence[int], generator: torch.Generator | None = None, dtype=None):
    """(n, m, *shape) directions, each of unit Euclidean norm and uniform on the sphere (normalized Gaussians)."""
    d = torch.randn(n, m, math.prod(shape), generator=generator, dtype=dtype or torch.get_default_dtype())
    return (d / d.norm(dim=-1, keepdim=True)).reshape(n, m, *shape)


def _check_times(times: Sequence[float]) -> list[float]:
    ts = [float(t) for t in times]
    if not ts or any(not 0.0 <= t < 1.0 for t in ts) or any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"stability.times must be strictly increasing values in [0, 1), got {list(times)}")
    return ts


def states_at(velocity: Velocity, x0: Tensor, times: Sequence[float], solver: Solver) -> Tensor:
    """(T, n, ...): x_t = Phi_{0->t}(x0) at each of the increasing ``times`` in [0, 1), integrated piecewise
    with ``solver`` from one time to the next (x_0 = x0 itself)."""
    ts = _check_times(times)
    out, x, t_prev = [], x0, 0.0
    for t in ts:
        if t > t_prev:
            x = solver.integrate(velocity, x, t0=t_prev, t1=t).x1
            t_prev = t
        out.append(x)
    return torch.stack(out)


@dataclass
class Sensitivity:
    """``ratios`` (T, n, m): r_ij(t) of the module docstring at each of ``times``; ``nfe`` (T,) the solver's
    velocity evaluations from each t to 1; ``eps`` the perturbation size."""

    times: list[float]
    ratios: Tensor
    nfe: list[int]
    eps: float

    def mean_over_directions(self) -> Tensor:
        """(T, n): the amplification of each source at each time, averaged over its m directions."""
        return self.ratios.mean(dim=2)


def perturbation_sensitivity(
    velocity: Velocity,
    x0: Tensor,
    times: Sequence[float],
    eps: float,
    directions: Tensor,
    solver: Solver,
) -> Sensitivity:
    """r_ij(t) (module docstring, 2.) for sources ``x0`` (n, ...) and ``directions`` (n, m, ...) of unit norm:
    the states x_t come from :func:`states_at` with ``solver``, and the base state with its m perturbed copies
    is integrated from t to 1 by ``solver`` in one batch."""
    if not eps > 0:
        raise ValueError(f"stability.eps must be > 0, got {eps}")
    n, m = directions.shape[:2]
    if n != len(x0) or directions.shape[2:] != x0.shape[1:]:
        raise ValueError(
            f"directions must have shape (n, m, *x0.shape[1:]) = ({len(x0)}, m, ...), got {directions.shape}"
        )
    directions = directions.to(x0)
    states = states_at(velocity, x0, times, solver)
    ratios, nfe = [], []
    for t, xt in zip(_check_times(times), states):
        batch = torch.cat([xt[:, None], xt[:, None] + eps * directions], dim=1)  # (n, 1 + m, ...)
        res = solver.integrate(velocity, batch.flatten(0, 1), t0=t, t1=1.0)
        x1 = res.x1.reshape(n, 1 + m, *x0.shape[1:])
        diff = (x1[:, 1:] - x1[:, :1]).flatten(2).norm(dim=2)  # (n, m)
        ratios.append(diff / eps)
        nfe.append(res.nfe)
    return Sensitivity(list(map(float, times)), torch.stack(ratios), nfe, float(eps))


def stability_rows(
    velocity: Velocity,
    x0: Tensor,
    directions: Tensor,
    *,
    methods: Sequence[str] = ("euler",),
    steps: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    ref_atol: float = 1e-8,
    ref_rtol: float = 1e-8,
    times: Sequence[float] = (0.0, 0.5),
    eps: float = 1e-3,
    atol: float = 1e-6,
    rtol: float = 1e-6,
) -> list[dict]:
    """Both measurements as rows of one table (column ``measure``):

    - ``reference``: the dopri5 reference (``ref_atol``, ``ref_rtol``): its NFE and ``gap_mean``, the mean
      distance to dopri5 at 100 x looser tolerances (how much the reference itself may be off, at most);
    - ``endpoint_error``: :func:`endpoint_errors` against that reference, one row per (method, steps);
    - ``sensitivity``: :func:`perturbation_sensitivity` with dopri5 (``atol``, ``rtol``), one row per time t:
      ``mean`` = (1/(n m)) sum_ij r_ij(t), and over the n sources' direction-averaged ratios their ``std``,
      ``q10``, ``median``, ``q90`` and ``max``; ``nfe`` from t to 1."""
    ref = reference_solver(ref_atol, ref_rtol).integrate(velocity, x0)
    loose = reference_solver(100 * ref_atol, 100 * ref_rtol).integrate(velocity, x0)
    rows = [
        {
            "measure": "reference",
            "nfe": ref.nfe,
            "atol": ref_atol,
            "rtol": ref_rtol,
            "gap_mean": float(_norms(ref.x1 - loose.x1).mean()),
        }
    ]
    rows += [{"measure": "endpoint_error", **r} for r in endpoint_errors(velocity, x0, ref.x1, methods, steps)]
    sens = perturbation_sensitivity(velocity, x0, times, eps, directions, reference_solver(atol, rtol))
    per_source = sens.mean_over_directions()
    for k, t in enumerate(sens.times):
        r = per_source[k]
        q10, q50, q90 = torch.quantile(r, torch.tensor([0.1, 0.5, 0.9], dtype=r.dtype)).tolist()
        rows.append(
            {
                "measure": "sensitivity",
                "t": t,
                "nfe": sens.nfe[k],
                "mean": float(sens.ratios[k].mean()),
                "std": float(r.std()) if len(r) > 1 else 0.0,
                "q10": q10,
                "median": q50,
                "q90": q90,
                "max": float(r.max()),
                "eps": sens.eps,
                "atol": atol,
                "rtol": rtol,
                "n_directions": int(directions.shape[1]),
            }
        )
    return rows
