"""The base of every coupling (:mod:`flowmatch.couplings`): set-up with the two ends, the finite pair set and the
held-out pairs, batches drawn from a finite set, the optimal assignment over whole sets, and checkpointing of the
pair sets; plus the checks of ``n_pairs`` and ``n_holdout`` shared by the couplings."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flowmatch.ot_large import OTSolver, exact_permutation
from flowmatch.streams import generator as stream_generator

__all__ = ["Coupling", "ot_assignment"]


ot_assignment = exact_permutation
"""Permutation ``perm`` minimising sum_i ||x0_i - x1_perm[i]||^2 (exact, Hungarian algorithm)."""


class Coupling:
    """Base class. ``setup`` attaches the ends, runs the subclass's :meth:`prepare` (a finite pair set, a
    transport matrix) and draws the held-out pairs. Finite couplings hold ``pairs = (X0, X1)``; with
    ``n_holdout`` > 0 every coupling holds ``holdout = (X0, X1)``, pairs made by its procedure but never trained
    on (module docstring)."""

    name = "base"
    finite = False
    ot_solver: OTSolver | None = None  # assign(): exact when None
    last_assignment = None

    def __init__(self, n_holdout: int = 0, seed: int = 0) -> None:
        self.p0 = self.p1 = None
        self.pairs: tuple[Tensor, Tensor] | None = None
        self.holdout: tuple[Tensor, Tensor] | None = None
        self.n_holdout, self.seed = _check_n_holdout(n_holdout), int(seed)

    def setup(self, p0, p1, generator: torch.Generator | None = None) -> None:
        """Attach the t = 0 / t = 1 distributions, :meth:`prepare`, then :meth:`setup_holdout`."""
        self.p0, self.p1 = p0, p1
        self.prepare()
        self.setup_holdout()

    def prepare(self) -> None:
        """Subclasses: what ``sample`` needs (a finite pair set is drawn only when none was restored)."""

    def setup_holdout(self) -> None:
        """Draw ``n_holdout`` held-out pairs from the ``holdout`` stream of ``seed`` (kept when already set)."""
        if self.n_holdout and self.holdout is None:
            self.holdout = self.draw_pairs(self.n_holdout, stream_generator(self.seed, "holdout"))

    def draw_pairs(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` new pairs by this coupling's procedure (finite couplings: how the pair set is drawn; default: a
        fresh batch of :meth:`sample`)."""
        return self.sample(n, generator)

    def assign(self, x0: Tensor, x1: Tensor) -> Tensor:
        """The squared-L2 optimal assignment ``perm`` (x0_i <-> x1_perm[i]) of two whole finite sets: exact, or by
        the coupling's ``ot_solver`` when it has one (its result, with cost and certified gap, in
        ``last_assignment``)."""
        if self.ot_solver is None:
            return ot_assignment(x0, x1)
        self.last_assignment = self.ot_solver(x0, x1)
        return self.last_assignment.perm

    def pair(self, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        """Pair independent samples ``x0`` of p0 and ``x1`` of p1 by this coupling's batch rule (held-out pairs
        of a data set): as they are (default), or re-paired by exact OT (``ot``)."""
        return x0, x1

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` training pairs: indices drawn with replacement into the finite pair set (finite couplings)."""
        if self.pairs is None:
            raise RuntimeError(f"coupling {self.name!r}: call setup(p0, p1) before sample()")
        idx = torch.randint(len(self.pairs[0]), (n,), generator=generator)
        return self.pairs[0][idx], self.pairs[1][idx]

    # Finite pair sets and held-out pairs are saved in checkpoints so evaluation sees exactly the training pairs.
    def state_dict(self) -> dict:
        """The finite pair set (keys ``x0``, ``x1``) and the held-out pairs (``holdout_x0``, ``holdout_x1``), each
        when there is one."""
        out = {} if self.pairs is None else {"x0": self.pairs[0], "x1": self.pairs[1]}
        if self.holdout is not None:
            out.update(holdout_x0=self.holdout[0], holdout_x1=self.holdout[1])
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (a later ``setup`` keeps it)."""
        if "x0" in state:
            self.pairs = (state["x0"], state["x1"])
        if "holdout_x0" in state:
            self.holdout = (state["holdout_x0"], state["holdout_x1"])

    def __repr__(self) -> str:
        n = "" if self.pairs is None else f", n_pairs={len(self.pairs[0])}"
        h = "" if self.holdout is None else f", n_holdout={len(self.holdout[0])}"
        return f"{type(self).__name__}(name={self.name}{n}{h})"


def _check_n_pairs(n_pairs) -> int:
    if n_pairs is None or int(n_pairs) < 1:
        raise ValueError(f"coupling.n_pairs must be an integer >= 1, got {n_pairs}")
    return int(n_pairs)


def _check_n_holdout(n_holdout) -> int:
    if isinstance(n_holdout, bool) or not isinstance(n_holdout, (int, np.integer)) or n_holdout < 0:
        raise ValueError(f"coupling.n_holdout must be an integer >= 0 (0: no held-out pairs), got {n_holdout!r}")
    return int(n_holdout)
