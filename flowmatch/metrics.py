"""Evaluation metrics on generated samples.

Pair metrics compare endpoints x_hat1_i integrated from the *training* sources x0_i with the
training targets: ``pair_acc`` (is the nearest training target the own partner?),
``l2_partner`` (mean ||x_hat1_i - x1_i||) and ``l2_ot`` (mean ||x_hat1_i - T_OT(x0_i)||).
Distribution metrics: ``mmd2_rbf`` (RBF-kernel MMD^2) and ``sample_moments`` for the Bures-Wasserstein
distance :func:`flowmatch.gaussian.gaussian_w2`. The keys these numbers are written under are in
:mod:`flowmatch.keys`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pair_accuracy", "l2_distances", "mean_l2", "mmd2_rbf", "sample_moments"]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).double()


def pair_accuracy(x1_hat: Tensor, targets: Tensor, chunk: int = 1024, partners: Tensor | None = None) -> float:
    """Fraction of i with argmin_j ||x1_hat_i - targets_j|| == p_i, where p_i = ``partners[i]`` is the index of
    i's partner among ``targets`` (default p_i = i: targets_i is i's partner). ``targets`` may hold more points
    than ``x1_hat`` (a subset of the training sources scored against every training target).

    Ties are resolved to the lowest index (as ``argmin`` does).
    """
    a, b = _flat(x1_hat), _flat(targets)
    p = torch.arange(len(a)) if partners is None else partners.reshape(-1).long().cpu()
    if len(p) != len(a):
        raise ValueError(f"pair_accuracy: {len(p)} partner indices for {len(a)} endpoints")
    hits = 0
    for s in range(0, len(a), chunk):
        nearest = torch.cdist(a[s : s + chunk], b).argmin(dim=1)
        hits += int((nearest.cpu() == p[s : s + len(nearest)]).sum())
    return hits / len(a)


def l2_distances(x: Tensor, y: Tensor) -> Tensor:
    """The Euclidean distances ||x_i - y_i|| (flattened, float64), one per sample."""
    return (_flat(x) - _flat(y)).norm(dim=1)


def mean_l2(x: Tensor, y: Tensor) -> float:
    """Mean over samples of the Euclidean distance ||x_i - y_i|| (flattened)."""
    return float(l2_distances(x, y).mean())


def _median_distance(z: Tensor, max_n: int = 2000) -> Tensor:
    z = z[:max_n]
    d = torch.cdist(z, z)
    off = d[~torch.eye(len(z), dtype=torch.bool, device=z.device)]
    return off.median().clamp_min(1e-12)


def mmd2_rbf(x: Tensor, y: Tensor, scales=(0.5, 1.0, 2.0)) -> float:
    """Unbiased estimate of MMD^2(P, Q) with a mixture of Gaussian (RBF) kernels.

    k(a, b) = (1/|S|) sum_{s in S} exp(-||a - b||^2 / (2 (s h)^2)), where h is the median
    pairwise Euclidean distance of the pooled sample {x} u {y} (median heuristic) and
    S = ``scales``. MMD^2_u = mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j)
    - 2 mean_{i, j} k(x_i, y_j) (Gretton et al. 2012, eq. 3); it can be slightly negative.
    """
    a, b = _flat(x), _flat(y)
    h = _median_distance(torch.cat([a, b]))

    def k(u: Tensor, v: Tensor) -> Tensor:
        d2 = torch.cdist(u, v).pow(2)
        return sum(torch.exp(-d2 / (2 * (s * h) ** 2)) for s in scales) / len(scales)

    def within(u: Tensor) -> Tensor:
        n = len(u)
        return (k(u, u).sum() - k(u, u).diagonal().sum()) / (n * (n - 1))

    return float(within(a) + within(b) - 2 * k(a, b).mean())


def sample_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean and unbiased covariance of the flattened samples."""
    f = _flat(x)
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])
