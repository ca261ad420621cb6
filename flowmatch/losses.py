"""The conditional flow-matching loss, per sample.

    l_i(theta) = (1/D) || v_theta(x_t_i, t_i) - u_t_i ||^2

with (x_t, u_t) from the interpolant (mean over the D dimensions of one sample). The training
loss is the batch mean of l_i; the gradient-variance instrument differentiates each l_i.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from flowmatch.interpolants import Interpolant


def per_sample_loss(
    model: Callable[[Tensor, Tensor], Tensor],
    interpolant: Interpolant,
    x0: Tensor,
    x1: Tensor,
    t: Tensor,
    eps: Tensor,
) -> Tensor:
    """Return the (B,) vector of per-sample losses l_i for the velocity network ``model(x, t)``."""
    xt = interpolant.x_t(x0, x1, t, eps)
    ut = interpolant.u_t(x0, x1, t, eps)
    return regression_loss(model(xt, t), ut)


def regression_loss(v: Tensor, u: Tensor) -> Tensor:
    """(B,) per-sample (1/D) ||v_i - u_i||^2: the loss on precomputed (x_t, u_t) probes."""
    return (v - u).pow(2).flatten(1).mean(1)


def probe_loss(model: Callable[[Tensor, Tensor], Tensor], batch: dict) -> Tensor:
    """(B,) per-sample (1/D) ||v(x_t, t) - u_t||^2 on a probe with precomputed ``xt``, ``ut``, ``t``."""
    return regression_loss(model(batch["xt"], batch["t"]), batch["ut"])
