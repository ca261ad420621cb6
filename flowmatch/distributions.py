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

from flowmatch.gaussian import as_cov_matrix, as_mean, gaussian_ot_map, sqrtm_psd

__all__ = ["Distribution", "Gaussian", "StandardNormal", "GaussianMixture", "Empirical", "gaussian_ot_map_fn"]


class Distribution:
    """Interface: ``shape``, ``sample`` and, where known in closed form, ``moments``."""

    shape: tuple[int, ...]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples, shape ``(n, *shape)``."""
        raise NotImplementedError

    def moments(self) -> tuple[Tensor, Tensor] | None:
        """(mean (d,), covariance (d, d)) of the flattened samples, or None when not known in closed form."""
        return None

    @property
    def dim(self) -> int:
        """The number of coordinates of one sample, prod(shape)."""
        return math.prod(self.shape)


class Gaussian(Distribution):
    """N(mean, cov) on R^d (``shape`` may be an image shape; moments are over the flattened vector)."""

    def __init__(self, mean, cov, shape: tuple[int, ...] | None = None) -> None:
        dim = math.prod(shape) if shape is not None else (len(mean) if hasattr(mean, "__len__") else 1)
        self.shape = tuple(shape) if shape is not None else (dim,)
        self.mean = as_mean(mean, dim).float()
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
    def standard(cls, shape) -> Gaussian:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return cls(torch.zeros(math.prod(shape)), 1.0, shape=shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.dim, generator=generator)
        if not self.isotropic_identity:
            z = z @ self.cov_sqrt.T
        return (z + self.mean).reshape(n, *self.shape)

    def moments(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.cov

    def __repr__(self) -> str:
        return f"Gaussian(dim={self.dim})"


class StandardNormal(Distribution):
    """N(0, I) with event ``shape``, without a covariance matrix (12,288^2 floats for 64x64 RGB).

    On a ``device`` other than the CPU, a device generator is seeded from the CPU ``generator``.
    """

    def __init__(self, shape, device: torch.device | str | None = None) -> None:
        self.shape, self.device = tuple(shape), torch.device(device or "cpu")

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self.device.type == "cpu":
            return torch.randn(n, *self.shape, generator=generator)
        g = None
        if generator is not None:
            g = torch.Generator(self.device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        return torch.randn(n, *self.shape, generator=g, device=self.device)

    def __repr__(self) -> str:
        return f"StandardNormal(shape={self.shape})"


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
        """Mixture covariance: (1/k) sum_j (c_j - m)(c_j - m)^T + std^2 I."""
        c = self.centers - self.mean
        return c.T @ c / len(c) + self.std**2 * torch.eye(self.dim)

    def moments(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.cov

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
        # non_blocking: a blocking host-to-GPU copy would wait for the GPU to finish its queued work (every step)
        x = self.data[idx.to(self.data.device, non_blocking=True)].float()
        if self.hflip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device, non_blocking=True)
            x = torch.where(flip.reshape(n, *[1] * (x.dim() - 1)), x.flip(-1), x)
        return x

    def sample_distinct(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` distinct items of ``data`` (without replacement, uniformly ordered; no flips): all of them, in a
        random order, when ``n == len(self)``."""
        if not 1 <= int(n) <= len(self.data):
            raise ValueError(f"cannot draw {n} distinct items from a set of {len(self.data)} (coupling.n_pairs)")
        idx = torch.randperm(len(self.data), generator=generator)[: int(n)]
        return self.data[idx.to(self.data.device)].float()


def gaussian_ot_map_fn(p0: Distribution, p1: Distribution):
    """x0 -> T_OT(x0), the W2-optimal map between two :class:`Gaussian` ends (T(x) = A (x - m0) + m1, see
    :func:`flowmatch.gaussian.gaussian_ot_map`), as a float32 function of (B, d) batches; None unless both ends
    are Gaussian."""
    if not (isinstance(p0, Gaussian) and isinstance(p1, Gaussian)):
        return None
    a, b = gaussian_ot_map(p0.mean, p0.cov, p1.mean, p1.cov)
    a, b = a.float(), b.float()
    return lambda x: x @ a.T + b
