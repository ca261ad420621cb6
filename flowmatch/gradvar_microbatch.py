"""The micro-batch estimator of the per-sample gradient variance (for within-batch dependent couplings).

Companion of :mod:`flowmatch.gradvar` (same :class:`~flowmatch.gradvar.GradVarStats` output); see
:func:`microbatch_variance` for what it estimates and when to use it instead of per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flowmatch.gradvar import GradVarStats, TrainModeGuard, bin_edges, bin_index
from flowmatch.interpolants import PathSample
from flowmatch.losses import per_sample_loss
from flowmatch.persample import LossFn

__all__ = ["microbatch_variance"]


def microbatch_variance(
    model: nn.Module,
    sample_batch: Callable[..., PathSample],
    n_micro: int,
    micro_size: int,
    edges=None,
    *,
    loss_fn: LossFn = per_sample_loss,
) -> GradVarStats:
    """Micro-batch estimator of the per-sample gradient variance, for couplings whose samples are dependent
    inside a batch (minibatch OT, or anything computed jointly on a batch).

    Draws M = ``n_micro`` independent micro-batches of size m = ``micro_size`` as
    :class:`~flowmatch.interpolants.PathSample` s (``sample_batch(m)``, or ``sample_batch(m, t_lo, t_hi)`` per
    bin when ``edges`` is given: the callee must then draw times in [t_lo, t_hi]; times outside are rejected),
    computes each micro-batch mean gradient G_j = grad (1/m) sum_i l_i (l_i from ``loss_fn(model, batch)``,
    default the flow-matching loss) with one backward, and reports per bin

        grad_var         = m * (sum_j ||G_j||^2 - M ||Gbar||^2) / (M - 1),   Gbar = (1/M) sum_j G_j
        mean_grad_sqnorm = ||Gbar||^2      (the mean gradient of all N = M m samples, as in the per-sample case)
        grad_sqnorm      = (N - 1)/N * grad_var + ||Gbar||^2     (implied mean ||g||^2; not measured)
        n = N, loss = mean of all N losses.

    Since Var[G_j] = (1/m) [tr Sigma + (m - 1) c], with Sigma the per-sample covariance and c the mean
    within-batch cross-covariance, grad_var estimates tr Sigma + (m - 1) c: exactly tr Sigma (same expectation
    as the per-sample estimator) for i.i.d. samples, and otherwise the per-sample variance *as seen by SGD at
    batch size m* (m x the variance of a training batch's gradient). Use it when the coupling is solved per
    batch, with ``micro_size`` = the training batch size, because then the within-batch spread of the g_i that
    the per-sample estimator measures is not the gradient noise. Costs K M backward passes of size m; memory
    O(P). The model runs in eval mode (modes restored); ``.grad`` is not touched. ``method`` is "microbatch".
    """
    M, m = int(n_micro), int(micro_size)
    if M < 2 or m < 1:
        raise ValueError(f"microbatch_variance needs n_micro >= 2 and micro_size >= 1, got {M}, {m}")
    e = bin_edges(edges) if edges is not None else None
    ranges = [(0.0, 1.0)] if e is None else list(zip(e[:-1].tolist(), e[1:].tolist()))
    params = [p for p in model.parameters() if p.requires_grad]
    cols: dict[str, list[float]] = {k: [] for k in ("n", "loss", "grad_var", "grad_sqnorm", "mean_grad_sqnorm")}
    with TrainModeGuard(model), torch.enable_grad():
        for lo, hi in ranges:
            gsum = [torch.zeros_like(p, dtype=torch.float64) for p in params]
            sqsum = lsum = 0.0
            for _ in range(M):
                batch = sample_batch(m) if e is None else sample_batch(m, lo, hi)
                if not isinstance(batch, PathSample):
                    raise ValueError(f"sample_batch must return a PathSample, got {type(batch).__name__}")
                if e is not None and bool(bin_index(batch.t, torch.tensor([lo, hi])).any()):
                    raise ValueError(f"sample_batch(m, {lo}, {hi}) returned times outside the bin")
                losses = loss_fn(model, batch)
                if losses.shape != (m,):
                    raise ValueError(f"loss_fn must return shape ({m},), got {tuple(losses.shape)}")
                grads = torch.autograd.grad(losses.mean(), params, allow_unused=True)
                for acc, g in zip(gsum, grads):
                    if g is not None:
                        acc += g.double()
                sqsum += sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
                lsum += float(losses.detach().double().sum())
            mean_sq = sum(float(a.pow(2).sum()) for a in gsum) / M**2
            var = max(0.0, m * (sqsum - M * mean_sq) / (M - 1))
            N = M * m
            for k, v in zip(cols, (N, lsum / N, var, (N - 1) / N * var + mean_sq, mean_sq)):
                cols[k].append(v)
    lo_hi = torch.tensor(ranges, dtype=torch.float64).reshape(-1, 2)
    return GradVarStats(
        lo_hi[:, 0],
        lo_hi[:, 1],
        **{k: torch.tensor(v, dtype=torch.long if k == "n" else torch.float64) for k, v in cols.items()},
        method="microbatch",
    )
