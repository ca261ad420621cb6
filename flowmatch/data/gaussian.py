"""Synthetic data: N(0, I_d) noise against a Gaussian N(mean, cov) or a Gaussian mixture."""

from __future__ import annotations

import math

import torch

from flowmatch.data.base import FlowDataModule
from flowmatch.distributions import Gaussian, GaussianMixture
from flowmatch.streams import generator

KINDS = ("gaussian", "gmm")


def _check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"data.dim must be an integer >= 1, got {dim!r}")
    return dim


def _check_mean(mean, dim: int) -> torch.Tensor:
    """``data.mean`` as a tensor: a finite number (mean * 1) or a list of ``dim`` finite numbers."""
    try:
        value = torch.as_tensor(float(mean) if isinstance(mean, (int, float)) else [float(v) for v in mean])
    except (TypeError, ValueError):
        value = None
    if value is None or value.ndim > 1 or (value.ndim == 1 and len(value) != dim) or not torch.isfinite(value).all():
        raise ValueError(f"data.mean must be a finite number or a list of data.dim={dim} numbers, got {mean!r}")
    return value.float()


class GaussianDataModule(FlowDataModule):
    """Noise N(0, I_dim) and data either ``gaussian`` N(mean, cov) or ``gmm``: k equal-weight
    components N(c_j, std^2 I) with centres c_j on a circle of radius ``radius`` in the first two
    coordinates (dim >= 2) or drawn N(0, radius^2 I) by ``seed`` (``centers: random``).

    ``mean``: scalar or list; ``cov``: scalar, list of variances or matrix.
    """

    def __init__(
        self,
        coupling,
        dim: int = 2,
        kind: str = "gaussian",
        mean=5.0,
        cov=1.0,
        k: int = 8,
        radius: float = 5.0,
        std: float = 0.5,
        centers: str = "circle",
        **kwargs,
    ) -> None:
        super().__init__(coupling, **kwargs)
        self.dim = _check_dim(dim)
        if kind not in KINDS:
            raise ValueError(f"data.kind must be one of {list(KINDS)}, got {kind!r}")
        if centers not in ("circle", "random"):
            raise ValueError(f"data.centers must be one of ['circle', 'random'], got {centers!r}")
        self.kind, self.mean, self.cov = kind, _check_mean(mean, self.dim), cov
        self.k, self.radius, self.std, self.centers = int(k), float(radius), float(std), centers

    def _gmm_centers(self) -> torch.Tensor:
        if self.centers == "random" or self.dim < 2:
            g = generator(self.seed, "data")
            return self.radius * torch.randn(self.k, self.dim, generator=g)
        angles = 2 * math.pi * torch.arange(self.k) / self.k
        c = torch.zeros(self.k, self.dim)
        c[:, 0], c[:, 1] = self.radius * angles.cos(), self.radius * angles.sin()
        return c

    def build_ends(self):
        noise = Gaussian.standard(self.dim)
        if self.kind == "gaussian":
            data = Gaussian(self.mean.expand(self.dim).clone(), self.cov)
        else:
            data = GaussianMixture(self._gmm_centers(), self.std)
        return noise, data
