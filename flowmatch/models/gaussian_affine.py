"""The affine velocity model of the paper's Gaussian analysis (Lemma 1).

    v(x, t) = theta + Theta (I + t Theta)^{-1} (x - t theta),     theta in R^d, Theta in R^{d x d}.

This family contains the straight-line field of every affine coupling x1 = B x0 + b of x0 ~ N(0, I)
(theta = b, Theta = B - I); in particular the OT field (``"ot"``, Theta = M^{1/2} - I) and the rotated
field (``"rot"``, Theta_R = M^{1/2} R(angle) - I) for a target N(mean, M = cov). See
``flowmatch.gaussian``; exact loss and gradient-variance moments of this model are in
``flowmatch.analysis.oracle``.

The field is undefined where I + t Theta is singular (e.g. ``"rot"`` with angle 180 and cov = I at
t = 1/2, where every line crosses); ``forward`` then raises ``torch.linalg.LinAlgError``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmatch.gaussian import affine_velocity, field_params, singular_times

__all__ = ["GaussianAffine"]


class GaussianAffine(nn.Module):
    """Learnable affine field with parameters ``theta`` (d,) and ``Theta`` (d, d).

    ``field=None`` starts at theta = 0, Theta = 0 (v = 0); ``"ot"`` / ``"rot"`` start at the Lemma-1
    field of N(0, I) -> N(``mean``, ``cov``) (``angle`` in degrees for ``"rot"``). ``mean`` may be a
    scalar or a vector, ``cov`` a scalar, per-coordinate variances or a matrix (defaults 0 and I).
    """

    def __init__(self, dim: int, field: str | None = None, mean=None, cov=None, angle: float = 180.0) -> None:
        super().__init__()
        dim = int(dim)
        if dim < 1:
            raise ValueError(f"model.dim must be an integer >= 1, got {dim}")
        self.dim = dim
        self.theta = nn.Parameter(torch.zeros(dim))
        self.Theta = nn.Parameter(torch.zeros(dim, dim))
        if field is not None:
            self.set_field(field, mean, cov, angle)

    @torch.no_grad()
    def set_field(self, field: str, mean=None, cov=None, angle: float = 180.0) -> GaussianAffine:
        """Set (theta, Theta) to the ``"ot"`` or ``"rot"`` Lemma-1 field; returns ``self``."""
        theta, Theta = field_params(field, mean, cov, angle, dim=self.dim)
        self.theta.copy_(theta)
        self.Theta.copy_(Theta)
        return self

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x (B, d), t (B,) or a scalar -> v(x, t) (B, d)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"GaussianAffine expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        return affine_velocity(self.theta, self.Theta, x, t)

    def singular_times(self) -> list[float]:
        """Times in [0, 1] where the current field is undefined."""
        return singular_times(self.Theta.detach())

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
