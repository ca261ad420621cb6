"""The memorization probe (plain torch): per-time-bin loss and gradient variance of a model on a fixed subset of
training pairs and on held-out pairs made by the same procedure (``coupling.holdout``), their ratios, the pair
accuracy of integrated sources, and the alarm that watches one of the ratios. ``flowmatch/callbacks/
memorization.py`` runs it during training; ``flowmatch.diagnose`` reads what the callback wrote.

Probe (:func:`build_probe`): n pairs of each set with the *same* times t (stratified, n // K per bin, as the
gradient-variance probe) and the *same* noise eps, so bin k of the two sets differs only in the pairs. The
training subset is n of the coupling's finite pairs without replacement (cycled, in random positions, when there
are fewer than n), or n pairs drawn once from a coupling that draws afresh. With the per-bin statistics of
:mod:`flowmatch.gradvar` (loss_k = mean l_i, grad_var_k = (sum ||g_i||^2 - n_k ||gbar_k||^2) / (n_k - 1)):

    ratio_k(S) = S_k(held-out) / S_k(train)                  S in {loss, grad_var}; > 1: training pairs fit better
    gap(S)     = (1/|B|) sum_{k in B} log10 ratio_k(S)        B: the signal bins (inside ``signal_t``); decades

A model that has not memorized sees training and held-out pairs as draws of one distribution: ratio_k ~ 1 and
gap ~ 0 up to the probe's sampling error. Memorizing drives the training pairs' loss and gradient variance
towards zero while the held-out ones stay, and gap grows. :class:`Alarm` fires when the signal gap(S) is >=
``threshold`` at ``patience`` consecutive probes.

Pair accuracy@K (:func:`flowmatch.metrics.pair_accuracy`): the fraction of sources whose K-step Euler endpoint is
nearest to its own partner; training sources (the subset's distinct pairs) among every training target of a
finite coupling (the subset's targets otherwise), held-out sources among the held-out targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from flowmatch import metrics as M
from flowmatch.gradvar import bin_edges, gradient_variance, stratified_times
from flowmatch.gradvar_stats import GradVarStats
from flowmatch.interpolants import PathSample
from flowmatch.sampling import Solver

__all__ = ["SIGNALS", "MemProbe", "MemStats", "Alarm", "build_probe", "measure", "signal_bins", "probe_row"]

SIGNALS = {"loss": "loss", "grad_var": "grad_var"}
"""Alarm signals: the statistic S of gap(S) (module docstring)."""
_KEY = "callbacks.memorization"


@dataclass(frozen=True)
class MemProbe:
    """The two probe sets (same t and eps) and what pair accuracy scores: ``sources`` (distinct training
    sources), ``targets`` (the training targets searched) and ``partners`` (each source's partner in it)."""

    train: PathSample
    holdout: PathSample
    sources: Tensor
    targets: Tensor
    partners: Tensor

    def to(self, device) -> MemProbe:
        """The same probe with every tensor on ``device``."""
        return MemProbe(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _training_subset(coupling, n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x0, x1) of n probe positions, and (sources, targets, partners) for pair accuracy."""
    if coupling.pairs is None:  # draws afresh: n pairs drawn once stand for the training pairs
        x0, x1 = coupling.sample(n, g)
        return x0, x1, x0, x1, torch.arange(n)
    X0, X1 = coupling.pairs
    perm = torch.randperm(len(X0), generator=g)
    idx = perm[torch.randperm(n, generator=g) % len(X0)] if n > len(X0) else perm[:n]
    distinct = perm[: min(n, len(X0))]
    return X0[idx], X1[idx], X0[distinct], X1, distinct


def build_probe(coupling, interpolant, edges, probe_size: int, generator: torch.Generator) -> MemProbe:
    """The probe of the module docstring (on the CPU): n = (min(probe_size, n_holdout) // K) K pairs of each set,
    drawn from ``generator`` (the training subset, then the times, then the noise)."""
    e = bin_edges(edges)
    K = e.numel() - 1
    if coupling.holdout is None:
        raise ValueError(
            f"{_KEY} needs held-out pairs: coupling.n_holdout is {coupling.n_holdout} for coupling {coupling.name!r}"
            f" (set coupling.n_holdout >= {2 * K}, 2 x the number of bins)"
        )
    n_per_bin = min(int(probe_size), len(coupling.holdout[0])) // K
    if n_per_bin < 2:
        raise ValueError(
            f"{_KEY}.probe_size={probe_size} and coupling.n_holdout={len(coupling.holdout[0])} must both be >= "
            f"{2 * K} (2 x the number of bins)"
        )
    n = n_per_bin * K
    x0, x1, sources, targets, partners = (x.cpu() for x in _training_subset(coupling, n, generator))
    h0, h1 = coupling.holdout[0][:n].cpu(), coupling.holdout[1][:n].cpu()
    t = stratified_times(n_per_bin, e, generator).to(h0.dtype)
    eps = interpolant.sample_eps(h0, generator)
    train, holdout = interpolant(x0, x1, t, eps), interpolant(h0, h1, t, eps)
    return MemProbe(train, holdout, sources, targets, partners)


@dataclass
class MemStats:
    """Per-bin statistics of both sets and pair accuracy per Euler step count (train and held-out)."""

    train: GradVarStats
    holdout: GradVarStats
    pair_acc: dict[int, float]
    holdout_pair_acc: dict[int, float]

    def log_ratio(self, stat: str) -> Tensor:
        """(K,) log10 ratio_k(stat) = log10 S_k(held-out) - log10 S_k(train) (values floored at 1e-30)."""
        ho, tr = getattr(self.holdout, stat).double(), getattr(self.train, stat).double()
        return ho.clamp_min(1e-30).log10() - tr.clamp_min(1e-30).log10()

    def gap(self, stat: str, mask: Tensor) -> float:
        """gap(stat): the mean of :meth:`log_ratio` over the bins in ``mask`` (NaN when any of them is NaN)."""
        return float(self.log_ratio(stat)[mask].mean())


def measure(
    model: nn.Module,
    velocity,
    probe: MemProbe,
    edges,
    euler_steps=(1, 7),
    method: str = "auto",
    chunk_size: int = 256,
) -> MemStats:
    """Loss and gradient variance per bin of ``model`` on both probe sets (:func:`flowmatch.gradvar.
    gradient_variance`: exact per-sample gradients, model in eval mode, no ``.grad`` touched) and the pair
    accuracy of the field ``velocity(x, t)`` (the sampling weights; the caller sets its mode) with each of
    ``euler_steps`` Euler steps (no gradients)."""
    kw = {"method": method, "chunk_size": chunk_size}
    train = gradient_variance(model, probe.train, edges, **kw)
    holdout = gradient_variance(model, probe.holdout, edges, **kw)
    acc, acc_ho = {}, {}
    for k in euler_steps:
        solver = Solver("euler", steps=int(k))
        x1_hat = solver.integrate(velocity, probe.sources).x1
        acc[int(k)] = M.pair_accuracy(x1_hat, probe.targets, partners=probe.partners)
        acc_ho[int(k)] = M.pair_accuracy(solver.integrate(velocity, probe.holdout.x0).x1, probe.holdout.x1)
    return MemStats(train, holdout, acc, acc_ho)


def signal_bins(edges, t_range) -> Tensor:
    """(K,) bool: the bins [t_lo, t_hi] inside ``t_range`` = [a, b] (the bins the signal averages)."""
    e = bin_edges(edges)
    a, b = (float(v) for v in t_range)
    mask = (e[:-1] >= a - 1e-9) & (e[1:] <= b + 1e-9)
    if not bool(mask.any()):
        raise ValueError(f"{_KEY}.signal_t={[a, b]} contains no whole time bin of the edges {e.tolist()}")
    return mask


class Alarm:
    """Raised (once) at the probe where ``signal >= threshold`` has held for ``patience`` consecutive probes
    (a NaN signal breaks the streak); ``step`` is that probe's training step, None before."""

    def __init__(self, threshold: float, patience: int) -> None:
        if not math.isfinite(float(threshold)):
            raise ValueError(f"{_KEY}.threshold must be a finite number, got {threshold!r}")
        if isinstance(patience, bool) or int(patience) != patience or int(patience) < 1:
            raise ValueError(f"{_KEY}.patience must be an integer >= 1, got {patience!r}")
        self.threshold, self.patience = float(threshold), int(patience)
        self.streak, self.step = 0, None

    def update(self, step: int, signal: float) -> bool:
        """Count this probe; True exactly when the alarm is raised by it."""
        self.streak = self.streak + 1 if signal >= self.threshold else 0  # False for NaN
        if self.step is None and self.streak >= self.patience:
            self.step = int(step)
            return True
        return False

    def state_dict(self) -> dict:
        return {"streak": self.streak, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.step = int(state.get("streak", 0)), state.get("step")


def probe_row(step: int, stats: MemStats, signal: str, mask: Tensor, alarm: Alarm) -> dict:
    """One memorization.csv row: ``step``, ``signal_stat``, ``signal``, ``threshold``, ``streak``, ``alarm``
    (0/1), ``loss_gap``, ``var_gap``, ``pair_acc@euler{K}`` and ``holdout_pair_acc@euler{K}`` per K, then per bin
    XX ``binXX_{t_lo,t_hi,n,loss_train,loss_holdout,loss_ratio,var_train,var_holdout,var_ratio}``."""
    loss_gap, var_gap = stats.gap("loss", mask), stats.gap("grad_var", mask)
    row = {
        "step": int(step),
        "signal_stat": signal,
        "signal": loss_gap if signal == "loss" else var_gap,
        "threshold": alarm.threshold,
        "streak": alarm.streak,
        "alarm": int(alarm.step is not None),
        "loss_gap": loss_gap,
        "var_gap": var_gap,
    }
    row.update({f"pair_acc@euler{k}": v for k, v in stats.pair_acc.items()})
    row.update({f"holdout_pair_acc@euler{k}": v for k, v in stats.holdout_pair_acc.items()})
    tr, ho = stats.train, stats.holdout
    for k in range(tr.n.numel()):
        b = f"bin{k:02d}_"
        row.update(
            {
                b + "t_lo": float(tr.t_lo[k]),
                b + "t_hi": float(tr.t_hi[k]),
                b + "n": int(tr.n[k]),
                b + "loss_train": float(tr.loss[k]),
                b + "loss_holdout": float(ho.loss[k]),
                b + "loss_ratio": float(ho.loss[k] / tr.loss[k]),
                b + "var_train": float(tr.grad_var[k]),
                b + "var_holdout": float(ho.grad_var[k]),
                b + "var_ratio": float(ho.grad_var[k] / tr.grad_var[k]),
            }
        )
    return row
