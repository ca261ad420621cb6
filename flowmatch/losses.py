"""The conditional flow-matching loss, per sample.

    l_i(theta) = (1/D) || v_theta(x_t_i, t_i) - u_t_i ||^2

with (x_t, u_t) from the interpolant (mean over the D dimensions of one sample). The training
loss is the batch mean of l_i; the gradient-variance instrument differentiates each l_i.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from flowmatch.interpolants import PathSample

__all__ = ["per_sample_loss", "regression_loss"]


def per_sample_loss(model: Callable[[Tensor, Tensor], Tensor], path: PathSample) -> Tensor:
    """The (B,) vector l_i = (1/D) ||v(x_t_i, t_i) - u_t_i||^2 of the velocity network ``model(x, t)`` on a
    :class:`~flowmatch.interpolants.PathSample` (the training batch or a gradient-variance probe)."""
    return regression_loss(model(path.x_t, path.t), path.u_t)


def regression_loss(v: Tensor, u: Tensor) -> Tensor:
    """(B,) per-sample (1/D) ||v_i - u_i||^2."""
    return (v - u).pow(2).flatten(1).mean(1)
