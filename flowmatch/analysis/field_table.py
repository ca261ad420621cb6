"""Gradient variance of a fixed Lemma-1 field: Monte Carlo (exact per-sample gradients) next to the
closed form, per time bin (the paper's Prop. 1, Fig. 4 and Fig. 5).

The ``gaussian_affine`` model is set to the field ``ot`` or ``rot`` (``angle``) of N(0, I) -> N(mean, cov).
Pairs come from the coupling (a name of the ``coupling`` config group or a coupling object from it):
``independent`` (x1 ~ N(mean, cov) drawn independently), ``ot`` (x1 = mean + cov^{1/2} x0, the population
OT map) or ``rotated`` (x1 = mean + cov^{1/2} R x0, R by the coupling's own ``angle``); x_t and u_t come
from an interpolant of the ``interpolant`` group, so ``interpolant=cfm interpolant.sigma=0.05`` means here
what it means in training.
For each seed a probe with ``n_per_bin`` times uniform in every bin is measured with
:func:`flowmatch.gradvar.bin_sums`; the closed form is :func:`flowmatch.analysis.oracle.field_gradvar_table`
(same quantity: t uniform in the bin).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowmatch import gradvar as gv
from flowmatch.analysis.oracle import GaussianProblem, field_gradvar_table
from flowmatch.gaussian import coupling_map
from flowmatch.interpolants import Interpolant, Linear, PathSample
from flowmatch.models.gaussian_affine import GaussianAffine

FIELDS = ("ot", "rot")
STATS = ("loss", "grad_var", "grad_sqnorm", "mean_grad_sqnorm")


def _draw_probe(problem: GaussianProblem, edges, n_per_bin: int, seed: int) -> PathSample:
    """A float64 probe of ``problem`` with ``n_per_bin`` times uniform in each bin, drawn by ``seed``."""
    m, c, d = problem.mean, problem.cov, problem.dim
    g = torch.Generator().manual_seed(int(seed))
    t = gv.stratified_times(n_per_bin, edges, g).double()
    x0 = torch.randn(len(t), d, generator=g, dtype=torch.float64)
    if problem.coupling == "independent":
        x1 = m + torch.randn(len(t), d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c).T
    else:
        b_mat, b = coupling_map(problem.coupling, m, c, problem.angle)
        x1 = x0 @ b_mat.T + b
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return problem.interpolant(x0, x1, t, eps)


def field_gradvar_rows(
    field: str = "ot",
    angle: float = 180.0,
    coupling="independent",
    interpolant: Interpolant | None = None,
    mean=5.0,
    cov=1.0,
    dim: int = 2,
    bins=10,
    n_per_bin: int = 200,
    seeds: Sequence[int] = (0, 1, 2),
    n_t_exact: int = 64,
) -> list[dict]:
    """One row per (seed, bin) with the Monte Carlo statistics, plus rows with ``seed = "exact"``
    holding the closed form. Columns: seed, bin, t_lo, t_hi, n, loss, grad_var, grad_sqnorm,
    mean_grad_sqnorm.

    ``field``/``angle``: the Lemma-1 field the model is set to; ``coupling``: a coupling name or object
    (``rotated`` uses its ``angle`` attribute, else ``angle``); ``interpolant``: default ``Linear()``."""
    if field not in FIELDS:
        raise ValueError(f"field.name must be one of {list(FIELDS)}, got {field!r}")
    name = coupling if isinstance(coupling, str) else getattr(coupling, "name", None)  # GaussianProblem checks it
    problem = GaussianProblem.of(
        mean,
        cov,
        name,
        Linear() if interpolant is None else interpolant,
        angle=getattr(coupling, "angle", angle),
        dim=int(dim),
    )
    m, c = problem.mean, problem.cov
    edges = gv.bin_edges(bins)
    model = GaussianAffine(int(dim)).double().set_field(field, m, c, angle)
    rows = []
    for seed in seeds:
        probe = _draw_probe(problem, edges, int(n_per_bin), seed)
        stats = gv.gradient_variance(model, probe, edges, method="vmap")
        for k, r in enumerate(stats.rows(0)):
            r.pop("step")
            rows.append({"seed": seed, "bin": k, **r})
    params = (model.theta.detach(), model.Theta.detach())
    exact = field_gradvar_table(params, problem, edges.tolist(), n_t_exact)
    for k, r in enumerate(exact):
        rows.append(
            {
                "seed": "exact",
                "bin": k,
                "t_lo": r["t_lo"],
                "t_hi": r["t_hi"],
                "n": r["n_t"],
                **{s: float(r[s]) for s in STATS},
            }
        )
    return rows
