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

import torch
from torch import Tensor

__all__ = ["Interpolant", "Linear", "CFM", "Bridge"]


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
        raise NotImplementedError

    def dgamma(self, t: Tensor) -> Tensor:
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

    def __call__(self, x0: Tensor, x1: Tensor, t: Tensor, eps: Tensor | None = None):
        """Return ``(x_t, u_t)``; draws eps when not given."""
        if eps is None:
            eps = self.sample_eps(x0)
        return self.x_t(x0, x1, t, eps), self.u_t(x0, x1, t, eps)

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
