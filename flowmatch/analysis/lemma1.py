"""The paper's Lemma-1 velocity fields as callables (Reu et al. 2025, Sec. 3).

    v(x, t) = theta + Theta (I + t Theta)^{-1} (x - t theta)

is the straight-line field of the affine coupling x1 = (I + Theta) x0 + theta of x0 ~ N(0, I); the OT and
rotated choices of (theta, Theta) come from :func:`flowmatch.gaussian.field_params`, the evaluation from
:func:`flowmatch.gaussian.affine_velocity`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowmatch.gaussian import affine_velocity

__all__ = ["AffineField", "lemma1_field"]


@dataclass
class AffineField:
    """The Lemma-1 velocity field with parameters ``theta`` (d,) and ``Theta`` (d, d); callable as v(x, t)."""

    theta: Tensor
    Theta: Tensor

    def __call__(self, x: Tensor, t) -> Tensor:
        return affine_velocity(self.theta, self.Theta, x, t)

    @property
    def dim(self) -> int:
        return self.theta.shape[0]


def lemma1_field(theta, Theta) -> AffineField:
    """The field v(x, t) = theta + Theta (I + t Theta)^{-1} (x - t theta) as a callable ``AffineField``."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    Theta = torch.as_tensor(Theta, dtype=torch.float64)
    if Theta.shape != (theta.shape[0], theta.shape[0]):
        raise ValueError(f"Theta must be {theta.shape[0]}x{theta.shape[0]}, got {tuple(Theta.shape)}")
    return AffineField(theta, Theta)
