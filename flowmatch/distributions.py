"""Sampleable distributions: the two ends (t = 0 and t = 1) of a flow.

A distribution has an event ``shape`` and ``sample(n, generator) -> Tensor`` of shape
``(n, *shape)`` (float32, CPU unless moved with ``to``). Gaussians also expose their
moments (``mean``, ``cov``, ``cov_sqrt``), which couplings, closed-form analysis and
metrics use; empirical distributions expose their finite ``data``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Distribution", "Gaussian", "GaussianMixture", "Empirical", "as_cov_matrix", "sqrtm_psd"]


def sqrtm_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigendecomposition in float64,
    of the symmetrised (A + A^T)/2; negative rounding-level eigenvalues clamped to 0)."""
    a64 = a.double()
    evals, evecs = torch.linalg.eigh((a64 + a64.T) / 2)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    return root.to(a.dtype)


def as_cov_matrix(cov, dim: int) -> Tensor:
    """Covariance from config: a scalar c (c I), a list of d variances (diagonal) or a d x d matrix."""
    c = torch.as_tensor(cov, dtype=torch.float64)
    if c.dim() == 0:
        return c * torch.eye(dim, dtype=torch.float64)
    if c.dim() == 1 and c.shape[0] == dim:
        return torch.diag(c)
    if c.shape == (dim, dim):
        if not torch.allclose(c, c.T):
            raise ValueError("data.cov must be symmetric")
        return c
    raise ValueError(f"data.cov must be a scalar, a list of {dim} variances or a {dim}x{dim} matrix, got shape {tuple(c.shape)}")


def _as_mean(mean, dim: int) -> Tensor:
    m = torch.as_tensor(mean, dtype=torch.float64)
    if m.dim() == 0:
        return m * torch.ones(dim, dtype=torch.float64)
    if m.shape != (dim,):
        raise ValueError(f"data.mean must be a scalar or a list of {dim} numbers, got shape {tuple(m.shape)}")
    return m


class Distribution:
    """Interface: ``shape`` and ``sample``."""

    shape: tuple[int, ...]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    @property
    def dim(self) -> int:
        return math.prod(self.shape)


class Gaussian(Distribution):
    """N(mean, cov) on R^d (``shape`` may be an image shape; moments are over the flattened vector)."""

    def __init__(self, mean, cov, shape: tuple[int, ...] | None = None) -> None:
        dim = math.prod(shape) if shape is not None else (len(mean) if hasattr(mean, "__len__") else 1)
        self.shape = tuple(shape) if shape is not None else (dim,)
        self.mean = _as_mean(mean, dim).float()
        self.cov = as_cov_matrix(cov, dim).float()
        eye = torch.eye(dim)
        self.isotropic_identity = bool(torch.equal(self.cov, eye))
        if self.isotropic_identity:
            self.cov_sqrt = eye
        else:
            evals = torch.linalg.eigvalsh(self.cov.double())
            if evals.min() < -1e-10:
                raise ValueError("data.cov must be positive semi-definite")
            self.cov_sqrt = sqrtm_psd(self.cov)

    @classmethod
    def standard(cls, shape) -> "Gaussian":
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return cls(torch.zeros(math.prod(shape)), 1.0, shape=shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.dim, generator=generator)
        if not self.isotropic_identity:
            z = z @ self.cov_sqrt.T
        return (z + self.mean).reshape(n, *self.shape)

    def __repr__(self) -> str:
        return f"Gaussian(dim={self.dim})"


class GaussianMixture(Distribution):
    """Equal-weight mixture of k isotropic Gaussians N(c_j, std^2 I)."""

    def __init__(self, centers: Tensor, std: float) -> None:
        self.centers = torch.as_tensor(centers, dtype=torch.float32)
        self.std = float(std)
        self.shape = (self.centers.shape[1],)

    @property
    def mean(self) -> Tensor:
        return self.centers.mean(0)

    @property
    def cov(self) -> Tensor:
        c = self.centers - self.mean
        return c.T @ c / len(c) + self.std**2 * torch.eye(self.dim)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.randint(len(self.centers), (n,), generator=generator)
        return self.centers[idx] + self.std * torch.randn(n, self.dim, generator=generator)


class Empirical(Distribution):
    """Uniform over a finite set of samples ``data`` (N, *shape), drawn with replacement.

    ``hflip`` flips images (N, C, H, W) horizontally with probability 1/2 at sampling time.
    Indices and flips come from the (CPU) ``generator`` even when ``data`` sits on a GPU, so the
    stream is seeded the same way wherever the data lives.
    """

    def __init__(self, data: Tensor, hflip: bool = False) -> None:
        self.data = data
        self.hflip = bool(hflip)
        self.shape = tuple(data.shape[1:])

    def __len__(self) -> int:
        return len(self.data)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.randint(len(self.data), (n,), generator=generator)
        x = self.data[idx.to(self.data.device)].float()
        if self.hflip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip.reshape(n, *[1] * (x.dim() - 1)), x.flip(-1), x)
        return x
