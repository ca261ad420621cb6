"""Interpolants between paired samples (x0, x1).

Every interpolant here has the form

    x_t = (1 - t) x0 + t x1 + gamma(t) * eps,      eps ~ N(0, I),
    u_t = d x_t / d t = x1 - x0 + gamma'(t) * eps,

with

    linear  (rectified flow):        gamma(t) = 0
    cfm     (the paper's CFM(sigma)): gamma(t) = sigma   (constant; gamma' = 0)
    bridge  (Brownian bridge):       gamma(t) = sigma * sqrt(t (1 - t)),
                                     gamma'(t) = sigma (1 - 2t) / (2 sqrt(t (1 - t))).

With sigma = 0 all three coincide. The velocity target u_t is the conditional
velocity regressed by flow matching (Lipman et al. 2023; Tong et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["PathSample", "Interpolant", "Linear", "CFM", "Bridge", "INTERPOLANTS"]


@dataclass(frozen=True)
class PathSample:
    """One batch of points on conditional paths: pairs ``(x0, x1)``, times ``t`` (B,), noise ``eps``, the
    point ``x_t`` and its regression target ``u_t`` (all batch-first). Interpolants return it, the training
    step and the gradient-variance probes carry it, and :func:`flowmatch.losses.per_sample_loss` reads it.

    Indexing (``path[i:j]``, ``path[index_tensor]``) selects the same samples in every field; ``to`` moves
    every field. A probe built from integrated trajectories stores the integrated endpoint as ``x1``.
    """

    x0: Tensor
    x1: Tensor
    t: Tensor
    eps: Tensor
    x_t: Tensor
    u_t: Tensor

    def __len__(self) -> int:
        return self.t.shape[0]

    def __getitem__(self, index) -> PathSample:
        return PathSample(**{f.name: _take(getattr(self, f.name), index) for f in fields(self)})

    def to(self, device) -> PathSample:
        """The same sample with every field on ``device``."""
        return PathSample(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


PATH_FIELDS = tuple(f.name for f in fields(PathSample))  # its field names, in order (fields() is slow per call)


def _take(x: Tensor, index) -> Tensor:
    """Rows ``index`` of ``x``, moving a tensor index to ``x``'s device first."""
    return x[index.to(x.device)] if isinstance(index, Tensor) else x[index]


def _expand_time(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) time vector so it broadcasts against a (B, ...) tensor."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


class Interpolant:
    """Base class: subclasses define ``gamma`` and ``dgamma``.

    ``sigma`` is the noise scale (config key ``interpolant.sigma``); it must be >= 0.
    """

    name = "base"

    def __init__(self, sigma: float = 0.0) -> None:
        sigma = float(sigma)
        if not sigma >= 0.0:  # also rejects NaN
            raise ValueError(f"interpolant.sigma must be >= 0, got {sigma}")
        self.sigma = sigma

    @property
    def stochastic(self) -> bool:
        """True when x_t carries noise (sigma > 0)."""
        return self.sigma > 0.0

    def gamma(self, t: Tensor) -> Tensor:
        """The noise scale gamma(t) of x_t (B,)."""
        raise NotImplementedError

    def dgamma(self, t: Tensor) -> Tensor:
        """Its time derivative gamma'(t) (B,)."""
        raise NotImplementedError

    def sample_eps(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise shaped like ``x0`` (zeros when sigma = 0, to save work)."""
        if not self.stochastic:
            return torch.zeros_like(x0)
        return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)

    def x_t(self, x0: Tensor, x1: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = (1 - t) x0 + t x1 + gamma(t) eps."""
        tt = _expand_time(t, x0)
        return (1 - tt) * x0 + tt * x1 + _expand_time(self.gamma(t), x0) * eps

    def u_t(self, x0: Tensor, x1: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """u_t = x1 - x0 + gamma'(t) eps, the time derivative of ``x_t`` at fixed (x0, x1, eps)."""
        return x1 - x0 + _expand_time(self.dgamma(t), x0) * eps

    def __call__(self, x0: Tensor, x1: Tensor, t: Tensor, eps: Tensor | None = None) -> PathSample:
        """The :class:`PathSample` at times ``t`` (x_t and u_t as above); draws eps when not given."""
        if eps is None:
            eps = self.sample_eps(x0)
        return PathSample(x0, x1, t, eps, self.x_t(x0, x1, t, eps), self.u_t(x0, x1, t, eps))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


class Linear(Interpolant):
    """Deterministic straight line (rectified flow); ``sigma`` must be 0."""

    name = "linear"

    def __init__(self, sigma: float = 0.0) -> None:
        super().__init__(sigma)
        if self.sigma != 0.0:
            raise ValueError(
                f"interpolant.sigma must be 0 for interpolant=linear (got {sigma}); "
                "use interpolant=cfm or interpolant=bridge for sigma > 0"
            )

    def gamma(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def dgamma(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)


class CFM(Interpolant):
    """Constant noise: gamma(t) = sigma (the paper's CFM(sigma)); u = x1 - x0."""

    name = "cfm"

    def gamma(self, t: Tensor) -> Tensor:
        return torch.full_like(t, self.sigma)

    def dgamma(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)


class Bridge(Interpolant):
    """Brownian bridge: gamma(t) = sigma sqrt(t (1 - t)).

    gamma'(t) diverges at t in {0, 1}; the denominator sqrt(t(1-t)) is clamped at
    ``t_clamp`` (default 1e-4) so u stays finite when t hits an endpoint exactly.
    """

    name = "bridge"

    def __init__(self, sigma: float = 0.0, t_clamp: float = 1e-4) -> None:
        super().__init__(sigma)
        self.t_clamp = float(t_clamp)

    def gamma(self, t: Tensor) -> Tensor:
        return self.sigma * torch.sqrt((t * (1 - t)).clamp_min(0.0))

    def dgamma(self, t: Tensor) -> Tensor:
        c = self.t_clamp
        root = torch.sqrt((t * (1 - t)).clamp_min(c * (1 - c)))
        return self.sigma * (1 - 2 * t) / (2 * root)


INTERPOLANTS = {cls.name: cls for cls in (Linear, CFM, Bridge)}
