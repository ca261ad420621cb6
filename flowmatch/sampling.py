"""ODE integration of a learned velocity field with torchdiffeq.

Solves dx/dt = v(x, t) from t0 to t1 (default 0 -> 1). Fixed-grid solvers (``euler``,
``midpoint``, ``rk4``) take ``steps`` uniform steps; ``dopri5`` is adaptive with ``atol``/``rtol``.
The number of function evaluations (NFE) is counted by wrapping the velocity: Euler uses
``steps`` evaluations, midpoint ``2 steps``, rk4 ``4 steps`` (torchdiffeq's 3/8-rule RK4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq import odeint

FIXED_GRID = ("euler", "midpoint", "rk4")
ADAPTIVE = ("dopri5",)
METHODS = FIXED_GRID + ADAPTIVE

__all__ = ["Solver", "SampleResult", "METHODS", "IntegrationError"]


class IntegrationError(RuntimeError):
    """dopri5 could not integrate the field: its step size underflowed or it ran out of ``max_num_steps`` (a field
    with huge or non-finite velocities, e.g. after a diverged training)."""


@dataclass
class SampleResult:
    """Endpoint ``x1`` (B, ...), the NFE, and, if asked, the trajectory (T, B, ...) at times ``t``."""

    x1: Tensor
    nfe: int
    traj: Tensor | None = None
    t: Tensor | None = None


class Solver:
    """An ODE solver configuration (config group ``solver``).

    ``method``: one of euler, midpoint, rk4, dopri5; ``steps`` (>= 1) for fixed-grid methods;
    ``atol``/``rtol`` (> 0) and ``max_num_steps`` for dopri5.
    """

    def __init__(
        self,
        method: str = "euler",
        steps: int = 100,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        max_num_steps: int = 100_000,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"solver.method must be one of {list(METHODS)}, got {method!r}")
        if int(steps) < 1:
            raise ValueError(f"solver.steps must be an integer >= 1, got {steps}")
        if not (atol > 0 and rtol > 0):
            raise ValueError(f"solver.atol and solver.rtol must be > 0, got atol={atol}, rtol={rtol}")
        self.method, self.steps = method, int(steps)
        self.atol, self.rtol, self.max_num_steps = float(atol), float(rtol), int(max_num_steps)

    @property
    def tag(self) -> str:
        """Short name used as a metric suffix: ``euler7``, ``rk4_20``, ``dopri5``."""
        if self.method in ADAPTIVE:
            return self.method
        sep = "_" if self.method[-1].isdigit() else ""
        return f"{self.method}{sep}{self.steps}"

    def __repr__(self) -> str:
        return f"Solver({self.tag})"

    @torch.no_grad()
    def integrate(
        self,
        velocity: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        t0: float = 0.0,
        t1: float = 1.0,
        return_traj: bool = False,
        traj_points: int | None = None,
    ) -> SampleResult:
        """Integrate ``velocity(x, t)`` (t of shape (B,)) from ``x0`` at ``t0`` to ``t1``.

        With ``return_traj`` the states at the solver grid (fixed-grid methods) or at
        ``traj_points`` uniform times (dopri5; default 101) are returned too.
        """
        nfe = 0
        batch = x0.shape[0]

        def f(t: Tensor, x: Tensor) -> Tensor:
            nonlocal nfe
            nfe += 1
            return velocity(x, t.expand(batch).to(x.dtype))

        if self.method in FIXED_GRID:
            grid = torch.linspace(t0, t1, self.steps + 1, dtype=torch.float64)
            ts = grid if return_traj else grid[[0, -1]]
            options = {"step_size": (t1 - t0) / self.steps} if not return_traj else None
            out = odeint(f, x0, ts.to(x0.device, x0.dtype), method=self.method, options=options)
        else:
            n_t = (traj_points or 101) if return_traj else 2
            ts = torch.linspace(t0, t1, n_t, dtype=x0.dtype, device=x0.device)
            try:
                out = odeint(
                    f,
                    x0,
                    ts,
                    method=self.method,
                    atol=self.atol,
                    rtol=self.rtol,
                    options={"max_num_steps": self.max_num_steps},
                )
            except AssertionError as exc:  # torchdiffeq's 'underflow in dt', 'max_num_steps exceeded'
                raise IntegrationError(
                    f"{self.method} could not integrate the learned field ({exc} after {nfe} evaluations): its "
                    f"velocities are huge or not finite; a fixed-grid solver (solver=euler solver.steps=100) still "
                    f"runs"
                ) from None
        return SampleResult(
            x1=out[-1], nfe=nfe, traj=out if return_traj else None, t=ts.to(x0.dtype) if return_traj else None
        )
