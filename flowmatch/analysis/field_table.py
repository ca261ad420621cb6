"""Gradient variance of a fixed Lemma-1 field: Monte Carlo (exact per-sample gradients) next to the
closed form, per time bin (the paper's Prop. 1, Fig. 4 and Fig. 5).

The ``gaussian_affine`` model is set to the field ``ot`` or ``rot`` (angle) of N(0, I) -> N(mean, cov).
Pairs come from the coupling: ``independent`` (x1 ~ N(mean, cov) drawn independently), ``ot``
(x1 = mean + cov^{1/2} x0, the population OT map) or ``rotated`` (x1 = mean + cov^{1/2} R x0).
For each seed a probe with ``n_per_bin`` times uniform in every bin is measured with
:func:`flowmatch.gradvar.bin_sums`; the closed form is :func:`flowmatch.analysis.oracle.field_gradvar_table`
(same quantity: t uniform in the bin).
"""
from __future__ import annotations

from typing import Sequence

import torch

from flowmatch import gradvar as gv
from flowmatch.analysis.gaussian import coupling_map, mean_cov
from flowmatch.analysis.oracle import field_gradvar_table
from flowmatch.interpolants import INTERPOLANTS
from flowmatch.losses import probe_loss
from flowmatch.models.gaussian_affine import GaussianAffine

COUPLINGS = ("independent", "ot", "rotated")
FIELDS = ("ot", "rot")
STATS = ("loss", "grad_var", "grad_sqnorm", "mean_grad_sqnorm")


def _draw_probe(coupling: str, interpolant, mean, cov, angle, edges, n_per_bin, seed) -> dict:
    m, c = mean_cov(mean, cov)
    d = m.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    t = gv.stratified_times(n_per_bin, edges, g).double()
    x0 = torch.randn(len(t), d, generator=g, dtype=torch.float64)
    if coupling == "independent":
        x1 = m + torch.randn(len(t), d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c).T
    else:
        b_mat, b = coupling_map(coupling, m, c, angle)
        x1 = x0 @ b_mat.T + b
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return {"xt": interpolant.x_t(x0, x1, t, eps), "ut": interpolant.u_t(x0, x1, t, eps), "t": t}


def field_gradvar_rows(field: str = "ot", angle: float = 180.0, coupling: str = "independent",
                       interpolant: str = "linear", sigma: float = 0.0, mean=5.0, cov=1.0, dim: int = 2,
                       bins=10, n_per_bin: int = 200, seeds: Sequence[int] = (0, 1, 2),
                       n_t_exact: int = 64) -> list[dict]:
    """One row per (seed, bin) with the Monte Carlo statistics, plus rows with ``seed = "exact"``
    holding the closed form. Columns: seed, bin, t_lo, t_hi, n, loss, grad_var, grad_sqnorm,
    mean_grad_sqnorm."""
    if field not in FIELDS:
        raise ValueError(f"field.name must be one of {list(FIELDS)}, got {field!r}")
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {list(COUPLINGS)} for task=gradvar_field, got {coupling!r}")
    if interpolant not in INTERPOLANTS:
        raise ValueError(f"interpolant must be one of {list(INTERPOLANTS)}, got {interpolant!r}")
    m, c = mean_cov(mean if hasattr(mean, "__len__") else [float(mean)] * int(dim), cov, int(dim))
    edges = gv.bin_edges(bins)
    interp = INTERPOLANTS[interpolant](sigma)
    model = GaussianAffine(int(dim)).double().set_field(field, m, c, angle)
    rows = []
    for seed in seeds:
        probe = _draw_probe(coupling, interp, m, c, angle, edges, int(n_per_bin), seed)
        stats = gv.gradient_variance(model, probe_loss, probe, edges, method="vmap")
        for k, r in enumerate(stats.rows(0)):
            r.pop("step")
            rows.append({"seed": seed, "bin": k, **r})
    exact = field_gradvar_table(field, angle, coupling, interpolant, sigma, m, c, edges.tolist(), n_t_exact)
    for k, r in enumerate(exact):
        rows.append({"seed": "exact", "bin": k, "t_lo": r["t_lo"], "t_hi": r["t_hi"], "n": r["n_t"],
                     **{s: float(r[s]) for s in STATS}})
    return rows
