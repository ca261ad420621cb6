"""End-of-training and ``evaluate.py`` metrics: integrate the learned field and score it.

Returns flat ``eval/...`` metrics as in DESIGN.md. Metrics from a named fixed-step solver carry
its tag as a suffix (``eval/pair_acc@euler7``); plain names are the configured solver's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from flowmatch import metrics as M
from flowmatch.couplings import ot_assignment
from flowmatch.sampling import Solver


@dataclass
class EvalSetup:
    """What evaluation needs from the data side (all after the direction is applied).

    ``pairs``: the coupling's finite training pairs (X0, X1) or None; ``ot_map``: x0 -> T_OT(x0)
    in closed form (Gaussian ends) or None; ``target_moments``: (mean, cov) of p1 if known.
    """

    p0: object
    p1: object
    pairs: tuple[Tensor, Tensor] | None = None
    ot_map: Callable[[Tensor], Tensor] | None = None
    target_moments: tuple[Tensor, Tensor] | None = None


@dataclass
class EvalResult:
    metrics: dict[str, float]
    trajectories: dict[str, Tensor] = field(default_factory=dict)


def _pair_metrics(x1_hat: Tensor, x1: Tensor, x1_ot: Tensor | None, suffix: str) -> dict[str, float]:
    out = {f"eval/pair_acc{suffix}": M.pair_accuracy(x1_hat, x1), f"eval/l2_partner{suffix}": M.mean_l2(x1_hat, x1)}
    if x1_ot is not None:
        out[f"eval/l2_ot{suffix}"] = M.mean_l2(x1_hat, x1_ot)
    return out


def ot_partners(setup: EvalSetup, x0: Tensor) -> Tensor | None:
    """T_OT(x0): the closed-form map when known, else the discrete OT partner among the training
    targets (only for the training sources themselves), else None."""
    if setup.ot_map is not None:
        return setup.ot_map(x0)
    if setup.pairs is not None and x0 is setup.pairs[0]:
        return setup.pairs[1][ot_assignment(*setup.pairs)]
    return None


def evaluate_flow(
    velocity: Callable[[Tensor, Tensor], Tensor],
    setup: EvalSetup,
    solver: Solver,
    euler_steps: Sequence[int] = (),
    n_fresh: int = 1000,
    seed: int = 0,
    w2_max_dim: int = 4096,
    keep_trajectories: Sequence[int] = (),
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Score ``velocity`` on the training pairs (pair metrics, ``mmd_mem``) and on ``n_fresh`` fresh
    sources (``mmd_gen``, ``w2``, ``nfe``; ``l2_ot`` too when there are no training pairs).

    ``keep_trajectories``: Euler step counts whose trajectories from the training sources are
    returned (``euler{K}``; the configured solver's under ``solver``), for figures.
    """
    out: dict[str, float] = {}
    trajs: dict[str, Tensor] = {}
    g = torch.Generator().manual_seed(seed)

    def run(s: Solver, x0: Tensor, traj: bool = False):
        return s.integrate(velocity, x0.to(device), return_traj=traj)

    if setup.pairs is not None:
        x0, x1 = setup.pairs
        x_ot = ot_partners(setup, x0)
        res = run(solver, x0, traj=bool(keep_trajectories))
        out.update(_pair_metrics(res.x1.cpu(), x1, x_ot, ""))
        out["eval/mmd_mem"] = M.mmd2_rbf(res.x1.cpu(), x1)
        if keep_trajectories:
            trajs["solver"] = res.traj.cpu()
        for k in euler_steps:
            r = run(Solver("euler", steps=int(k)), x0, traj=int(k) in keep_trajectories)
            out.update(_pair_metrics(r.x1.cpu(), x1, x_ot, f"@euler{int(k)}"))
            if r.traj is not None:
                trajs[f"euler{int(k)}"] = r.traj.cpu()

    fresh0, fresh1 = setup.p0.sample(n_fresh, g), setup.p1.sample(n_fresh, g)
    res = run(solver, fresh0)
    gen = res.x1.cpu()
    out["eval/nfe"] = float(res.nfe)
    out["eval/mmd_gen"] = M.mmd2_rbf(gen, fresh1)
    if setup.pairs is None and setup.ot_map is not None:
        out["eval/l2_ot"] = M.mean_l2(gen, setup.ot_map(fresh0))
        for k in euler_steps:
            r = run(Solver("euler", steps=int(k)), fresh0)
            out[f"eval/l2_ot@euler{int(k)}"] = M.mean_l2(r.x1.cpu(), setup.ot_map(fresh0))
    if gen[0].numel() <= w2_max_dim:
        mean1, cov1 = setup.target_moments or M.sample_moments(fresh1)
        out["eval/w2"] = M.gaussian_w2(*M.sample_moments(gen), mean1, cov1)
    return EvalResult(out, trajs)
