"""Evaluation of a learned flow: integrate it and score the endpoints (end of training and ``evaluate.py``).

One path for both: :func:`evaluate_flow` takes the field, an :class:`EvalSetup` (what the data side knows:
the ends, the training pairs, the OT map, the target moments, reference images) and :class:`EvalOptions`
(the ``eval`` config group), and returns :class:`EvalResult`. It runs three steps a reader can follow:

1. :func:`training_pair_metrics` - integrate the coupling's finite training sources with the configured solver
   and with Euler at each of ``euler_steps``: pair accuracy, L2 to the partner and to the OT partner (mean, and
   standard deviation over the sources for the configured solver), MMD.
2. :func:`fresh_sample_metrics` - integrate fresh sources: MMD to fresh targets, W2, NFE, and L2 to the OT map
   when there are no training pairs.
3. :func:`image_metrics` - image data as the target: memorization rate, and FID/KID when asked.

Keys are those of :mod:`flowmatch.keys`; ``protocol/...`` keys say how the numbers were made.
:func:`evaluate_module` runs it on a training module's sampling weights (end of training, ``evaluate.py``, the
``eval_steps`` callback).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flowmatch import image_metrics as IM
from flowmatch import metrics as M
from flowmatch.couplings import ot_assignment
from flowmatch.eval_setup import FID_SPLITS, EvalOptions, EvalResult, EvalSetup, FIDWarning
from flowmatch.gaussian import gaussian_w2
from flowmatch.keys import metric
from flowmatch.sampling import IntegrationError, Solver
from flowmatch.streams import generator

__all__ = [
    "EvalOptions",
    "EvalSetup",
    "EvalResult",
    "FIDWarning",
    "evaluate_flow",
    "evaluate_module",
    "ot_partners",
    "training_pair_metrics",
    "fresh_sample_metrics",
    "image_metrics",
    "FID_SPLITS",
]

Velocity = Callable[[Tensor, Tensor], Tensor]
Say = Callable[[str], None]
"""A progress reporter: told, in words, which evaluation step is about to run."""


def ot_partners(setup: EvalSetup, x0: Tensor) -> Tensor | None:
    """T_OT(x0): the closed-form map when known, else (only for the training sources themselves) the discrete OT
    partner among the training targets: ``setup.ot_targets`` when the coupling kept them, else the optimal
    assignment over the whole pair set (``setup.assign``, exact by default); else None."""
    if setup.ot_map is not None:
        return setup.ot_map(x0)
    if setup.pairs is not None and x0 is setup.pairs[0]:
        if setup.ot_targets is not None:
            return setup.ot_targets
        return setup.pairs[1][(setup.assign or ot_assignment)(*setup.pairs)]
    return None


def _integrate(velocity: Velocity, solver: Solver, x0: Tensor, device, batch_size: int | None = None):
    """Endpoints (CPU) and mean NFE of ``solver`` from ``x0``, in chunks of ``batch_size`` (None: one batch);
    :class:`IntegrationError` when an endpoint is NaN or inf."""
    parts = [solver.integrate(velocity, c.to(device)) for c in (x0.split(int(batch_size)) if batch_size else [x0])]
    x1 = torch.cat([p.x1.cpu() for p in parts])
    bad = int((~torch.isfinite(x1.flatten(1))).any(1).sum())
    if bad:  # no metric of such endpoints means anything (W2 would blame a non-symmetric covariance)
        raise IntegrationError(
            f"{solver.tag} sends {bad} of {len(x1)} sources to NaN or inf: the learned field is not usable (a diverged "
            f"training?)"
        )
    return x1, sum(p.nfe for p in parts) / len(parts)


def _pair_scores(x1_hat: Tensor, x1: Tensor, x1_ot: Tensor | None, k: int | None) -> dict[str, float]:
    """Pair accuracy and mean L2 to the partner and OT partner (``@euler{K}`` keys for k = K); the standard
    deviations over the sources for the configured solver (k None)."""
    d = M.l2_distances(x1_hat, x1)
    out = {metric("eval/pair_acc", k): M.pair_accuracy(x1_hat, x1), metric("eval/l2_partner", k): float(d.mean())}
    if k is None and len(d) > 1:
        out[metric("eval/l2_partner_std")] = float(d.std())
    if x1_ot is not None:
        d_ot = M.l2_distances(x1_hat, x1_ot)
        out[metric("eval/l2_ot", k)] = float(d_ot.mean())
        if k is None and len(d_ot) > 1:
            out[metric("eval/l2_ot_std")] = float(d_ot.std())
    return out


def _silent(message: str) -> None:
    """The default progress reporter of the evaluation steps: says nothing."""


def training_pair_metrics(
    velocity: Velocity, setup: EvalSetup, solver: Solver, options: EvalOptions, device, say: Say = _silent
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Step 1: pair metrics of the training sources with the configured solver (plain keys, the standard
    deviations, ``eval/mmd_mem``) and with Euler at each of ``options.euler_steps`` (``@euler{K}`` keys); the kept
    trajectories (``solver``, ``euler{K}``). Without kept trajectories the sources are integrated in chunks of
    ``options.batch_size``. ``say`` is told which solver is about to run."""
    x0, x1 = setup.pairs
    x_ot = ot_partners(setup, x0)
    keep = set(options.keep_trajectories)
    trajs: dict[str, Tensor] = {}
    out: dict[str, float] = {}
    for k in [None, *options.euler_steps]:
        s = solver if k is None else Solver("euler", steps=k)
        say(f"evaluate: {len(x0)} training sources with {s.tag}")
        if keep and (k is None or k in keep):
            r = s.integrate(velocity, x0.to(device), return_traj=True)
            x1_hat = r.x1.cpu()
            trajs["solver" if k is None else f"euler{k}"] = r.traj.cpu()
        else:
            x1_hat, _ = _integrate(velocity, s, x0, device, options.batch_size)
        out.update(_pair_scores(x1_hat, x1, x_ot, k))
        if k is None:
            m = None if options.mmd_max_n is None else int(options.mmd_max_n)
            out[metric("eval/mmd_mem")] = M.mmd2_rbf(x1_hat[:m], x1[:m])
    return out, trajs


def fresh_sample_metrics(
    velocity: Velocity,
    setup: EvalSetup,
    solver: Solver,
    options: EvalOptions,
    device,
    g: torch.Generator,
    say: Say = _silent,
) -> tuple[dict[str, float], Tensor, float]:
    """Step 2: ``eval/mmd_gen``, ``eval/nfe``, ``eval/w2`` and (no training pairs, OT map known) ``eval/l2_ot``
    with its ``@euler{K}`` variants, on ``options.n_fresh`` fresh sources and targets drawn from ``g``.
    Returns the metrics, the generated samples and the NFE."""
    fresh0, fresh1 = setup.p0.sample(options.n_fresh, g), setup.p1.sample(options.n_fresh, g)
    say(f"evaluate: {options.n_fresh} fresh samples with {solver.tag}")
    gen, nfe = _integrate(velocity, solver, fresh0, device, options.batch_size)
    out = {metric("eval/nfe"): float(nfe), metric("eval/mmd_gen"): M.mmd2_rbf(gen, fresh1)}
    if setup.pairs is None and setup.ot_map is not None:
        target = setup.ot_map(fresh0)
        out[metric("eval/l2_ot")] = M.mean_l2(gen, target)
        for k in options.euler_steps:
            say(f"evaluate: {options.n_fresh} fresh samples with euler{k} (L2 to the OT map)")
            x1_k, _ = _integrate(velocity, Solver("euler", steps=k), fresh0, device, options.batch_size)
            out[metric("eval/l2_ot", k)] = M.mean_l2(x1_k, target)
    if gen[0].numel() <= options.w2_max_dim:
        mean1, cov1 = setup.target_moments or M.sample_moments(fresh1)
        out[metric("eval/w2")] = float(gaussian_w2(*M.sample_moments(gen), mean1.flatten(), cov1))
    return out, gen, nfe


def _reference(setup: EvalSetup, split: str, n: int, g: torch.Generator) -> Tensor:
    data = setup.train_data if split == "train" else setup.test_data
    data = data() if callable(data) else data  # a held-out split may be loaded only when asked for
    if data is None:
        raise ValueError(f"eval.fid_split={split!r}: this data set has no {split} split here")
    return data[torch.randperm(len(data), generator=g)[:n]] if len(data) > n else data


def image_metrics(
    gen: Tensor, setup: EvalSetup, options: EvalOptions, device, g: torch.Generator, say: Say = _silent
) -> tuple[dict[str, float], dict[str, float | str]]:
    """Step 3 (image data as the target): ``eval/mem_rate`` against the training images and, with
    ``options.fid``, ``eval/fid``, ``eval/kid``, ``eval/kid_std`` against ``n_fresh`` real images of
    ``options.fid_split``; Inception weights that cannot be loaded skip FID/KID with a :class:`FIDWarning`."""
    out = {metric("eval/mem_rate"): IM.memorization_rate(gen, setup.train_data)}
    proto: dict[str, float | str] = {metric("protocol/split"): options.fid_split if options.fid else "train"}
    if not options.fid:
        return out, {**proto, metric("protocol/feature_extractor"): "off"}
    extractor = options.feature_extractor or "inception"
    name = extractor if isinstance(extractor, str) else type(extractor).__name__
    say(f"evaluate: FID and KID ({name} features) of {len(gen)} samples against the {options.fid_split} split")
    try:
        real = _reference(setup, options.fid_split, len(gen), g)
        r = IM.fid_kid(
            gen,
            real,
            extractor,
            device=device,
            inception_weights=options.inception_weights,
            kid_subsets=int(options.kid_subsets),
            kid_subset_size=int(options.kid_subset_size),
        )
    except IM.FeatureExtractorUnavailable as exc:
        warnings.warn(f"eval/fid and eval/kid skipped: {exc}", FIDWarning, stacklevel=3)
        return out, {**proto, metric("protocol/feature_extractor"): f"{name} (unavailable)"}
    out.update({metric("eval/fid"): r["fid"], metric("eval/kid"): r["kid"], metric("eval/kid_std"): r["kid_std"]})
    return out, {**proto, metric("protocol/feature_extractor"): name, metric("protocol/n_real"): float(len(real))}


def _solver_protocol(solver: Solver, nfe: float, options: EvalOptions) -> dict[str, float | str]:
    out: dict[str, float | str] = {metric("protocol/solver"): solver.tag}
    if solver.method == "dopri5":
        out.update({metric("protocol/atol"): solver.atol, metric("protocol/rtol"): solver.rtol})
    else:
        out[metric("protocol/solver_steps")] = float(solver.steps)
    out.update(
        {
            metric("protocol/nfe"): float(nfe),
            metric("protocol/n_samples"): float(options.n_fresh),
            metric("protocol/seed"): float(options.seed),
        }
    )
    return out


def evaluate_flow(
    velocity: Velocity,
    setup: EvalSetup,
    solver: Solver,
    options: EvalOptions | None = None,
    device: torch.device | str = "cpu",
    say: Say = _silent,
) -> EvalResult:
    """Score ``velocity`` (steps 1-3 of the module docstring) with ``solver`` and ``options``; ``say`` is told
    which step and solver is running (a long evaluation is not silent) and how long it took."""
    options = options or EvalOptions()
    start = time.perf_counter()
    g = generator(options.seed, "eval")
    out: dict[str, float] = {}
    trajs: dict[str, Tensor] = {}
    if setup.pairs is not None:
        out, trajs = training_pair_metrics(velocity, setup, solver, options, device, say)
    fresh, gen, nfe = fresh_sample_metrics(velocity, setup, solver, options, device, g, say)
    out.update(fresh)
    protocol = _solver_protocol(solver, nfe, options)
    if len(setup.p1.shape) > 1 and setup.train_data is not None:
        img, proto = image_metrics(gen, setup, options, device, g, say)
        out.update(img)
        protocol.update(proto)
    say(f"evaluate: done in {time.perf_counter() - start:.1f} s")
    return EvalResult(out, trajs, protocol)


def evaluate_module(
    module: nn.Module,
    setup: EvalSetup,
    solver: Solver,
    options: EvalOptions | None = None,
    device: torch.device | str = "cpu",
    ckpt_path: str | None = None,
    say: Say = _silent,
) -> EvalResult:
    """:func:`evaluate_flow` of a training module's sampling field ``module.velocity`` (the EMA copy when
    ``module.sampling_model`` is set), with ``module`` in eval mode and its previous mode restored afterwards.
    The protocol gains ``protocol/ema`` and, when ``ckpt_path`` is given, ``protocol/ckpt_path``. The one
    evaluation of the end of training, ``evaluate.py`` and the evaluation at given training steps."""
    was_training = module.training
    module.eval()
    try:
        result = evaluate_flow(module.velocity, setup, solver, options, device=device, say=say)
    finally:
        module.train(was_training)
    result.protocol[metric("protocol/ema")] = str(getattr(module, "sampling_model", None) is not None).lower()
    if ckpt_path is not None:
        result.protocol[metric("protocol/ckpt_path")] = str(ckpt_path)
    return result
