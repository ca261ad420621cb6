"""End-of-training and ``evaluate.py`` metrics: integrate the learned field and score it.

Returns flat ``eval/...`` metrics as in DESIGN.md. Metrics from a named fixed-step solver carry
its tag as a suffix (``eval/pair_acc@euler7``); plain names are the configured solver's.
For image data (event shape of more than one dimension, with ``EvalSetup.train_data``) it adds
``eval/mem_rate`` and, when asked, ``eval/fid``/``eval/kid`` (:mod:`flowmatch.image_metrics`), and
:attr:`EvalResult.protocol` describes how the numbers were made (``protocol/...`` keys).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from flowmatch import image_metrics as IM
from flowmatch import metrics as M
from flowmatch.couplings import ot_assignment
from flowmatch.sampling import Solver


@dataclass
class EvalSetup:
    """What evaluation needs from the data side (all after the direction is applied).

    ``pairs``: the coupling's finite training pairs (X0, X1) or None; ``ot_map``: x0 -> T_OT(x0)
    in closed form (Gaussian ends) or None; ``target_moments``: (mean, cov) of p1 if known.
    ``train_data`` / ``test_data``: the image data set's training / held-out split (CPU tensors;
    ``test_data`` may be a function returning it, called only when needed), set by image DataModules
    when the data is the target p1 (forward direction), else None.
    """

    p0: object
    p1: object
    pairs: tuple[Tensor, Tensor] | None = None
    ot_map: Callable[[Tensor], Tensor] | None = None
    target_moments: tuple[Tensor, Tensor] | None = None
    train_data: Tensor | None = None
    test_data: Tensor | Callable[[], Tensor] | None = None


@dataclass
class EvalResult:
    metrics: dict[str, float]
    trajectories: dict[str, Tensor] = field(default_factory=dict)
    protocol: dict[str, float | str] = field(default_factory=dict)


class FIDWarning(UserWarning):
    """FID/KID were asked for but could not be computed (the other metrics still are)."""


def _solver_protocol(solver: Solver) -> dict[str, float | str]:
    if solver.method in ("dopri5",):
        return {"protocol/solver": solver.tag, "protocol/atol": solver.atol, "protocol/rtol": solver.rtol}
    return {"protocol/solver": solver.tag, "protocol/solver_steps": float(solver.steps)}


def _reference(setup: EvalSetup, split: str, n: int, g: torch.Generator) -> Tensor:
    data = setup.train_data if split == "train" else setup.test_data
    data = data() if callable(data) else data  # a held-out split may be loaded only when asked for
    if data is None:
        raise ValueError(f"eval.fid_split={split!r}: this data set has no {split} split here")
    return data[torch.randperm(len(data), generator=g)[:n]] if len(data) > n else data


def _image_metrics(gen: Tensor, setup: EvalSetup, g: torch.Generator, fid: bool, feature_extractor,
                   fid_split: str, fid_kwargs: dict, device) -> tuple[dict, dict]:
    """eval/mem_rate (generated vs the training images) and, if ``fid``, eval/fid, eval/kid."""
    out = {"eval/mem_rate": IM.memorization_rate(gen, setup.train_data)}
    proto: dict[str, float | str] = {"protocol/split": fid_split if fid else "train"}
    if not fid:
        return out, {**proto, "protocol/feature_extractor": "off"}
    extractor = "inception" if feature_extractor is None else feature_extractor
    name = extractor if isinstance(extractor, str) else type(extractor).__name__
    try:
        real = _reference(setup, fid_split, len(gen), g)
        r = IM.fid_kid(gen, real, extractor, device=device, **fid_kwargs)
    except IM.FeatureExtractorUnavailable as exc:
        warnings.warn(f"eval/fid and eval/kid skipped: {exc}", FIDWarning, stacklevel=3)
        return out, {**proto, "protocol/feature_extractor": f"{name} (unavailable)"}
    out.update({"eval/fid": r["fid"], "eval/kid": r["kid"], "eval/kid_std": r["kid_std"]})
    return out, {**proto, "protocol/feature_extractor": name, "protocol/n_real": float(len(real))}


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
    batch_size: int | None = None,
    fid: bool = False,
    feature_extractor: str | nn.Module | None = None,
    fid_split: str = "train",
    fid_kwargs: dict | None = None,
) -> EvalResult:
    """Score ``velocity`` on the training pairs (pair metrics, ``mmd_mem``) and on ``n_fresh`` fresh
    sources (``mmd_gen``, ``w2``, ``nfe``; ``l2_ot`` too when there are no training pairs).

    ``keep_trajectories``: Euler step counts whose trajectories from the training sources are
    returned (``euler{K}``; the configured solver's under ``solver``), for figures.
    ``batch_size``: integrate the fresh sources in chunks of this size (None: one batch; ``eval/nfe``
    is then the mean over chunks). Image data: ``eval/mem_rate`` always; ``eval/fid``, ``eval/kid``
    (and ``eval/kid_std``) when ``fid``, with ``feature_extractor`` None/"inception" or an
    ``nn.Module``, against ``n_fresh`` images of the ``fid_split`` split ("train" or "test");
    ``fid_kwargs`` go to :func:`flowmatch.image_metrics.fid_kid` (``kid_subsets``,
    ``kid_subset_size``, ``inception_weights``, ``batch_size``). Inception weights that cannot be
    loaded skip FID/KID with a :class:`FIDWarning` naming why and how to get them.
    """
    out: dict[str, float] = {}
    trajs: dict[str, Tensor] = {}
    g = torch.Generator().manual_seed(seed)

    def run(s: Solver, x0: Tensor, traj: bool = False):
        return s.integrate(velocity, x0.to(device), return_traj=traj)

    def run_chunks(s: Solver, x0: Tensor) -> tuple[Tensor, float]:
        parts = [run(s, c) for c in (x0.split(int(batch_size)) if batch_size else [x0])]
        return torch.cat([p.x1.cpu() for p in parts]), sum(p.nfe for p in parts) / len(parts)

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
    gen, nfe = run_chunks(solver, fresh0)
    out["eval/nfe"] = float(nfe)
    out["eval/mmd_gen"] = M.mmd2_rbf(gen, fresh1)
    if setup.pairs is None and setup.ot_map is not None:
        out["eval/l2_ot"] = M.mean_l2(gen, setup.ot_map(fresh0))
        for k in euler_steps:
            x1_k, _ = run_chunks(Solver("euler", steps=int(k)), fresh0)
            out[f"eval/l2_ot@euler{int(k)}"] = M.mean_l2(x1_k, setup.ot_map(fresh0))
    if gen[0].numel() <= w2_max_dim:
        mean1, cov1 = setup.target_moments or M.sample_moments(fresh1)
        out["eval/w2"] = M.gaussian_w2(*M.sample_moments(gen), mean1, cov1)
    protocol = {**_solver_protocol(solver), "protocol/nfe": float(nfe), "protocol/n_samples": float(n_fresh),
                "protocol/seed": float(seed)}
    if len(setup.p1.shape) > 1 and setup.train_data is not None:
        img, proto = _image_metrics(gen, setup, g, fid, feature_extractor, fid_split, fid_kwargs or {}, device)
        out.update(img)
        protocol.update(proto)
    return EvalResult(out, trajs, protocol)
