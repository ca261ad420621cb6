"""Stop training at a non-finite loss, from the loss the step already has (no anomaly detection).

:class:`LossGuard` keeps the last finite loss, its step and the first step whose loss was NaN or inf. A loss on
the CPU of a single process is checked at once (reading it costs nothing there). On an accelerator the state stays
on the device (three element-wise ops per step, no sync) and :meth:`LossGuard.check` reads it: the training step
checks at the logging steps (``log_every_n_steps``), the module before any checkpoint is written and at the end of
training. A checkpoint never holds weights trained on a non-finite loss, the reported step is exact, and training
may run up to ``log_every_n_steps - 1`` steps past it before it stops.

Under DDP (an initialised process group of several ranks) no rank stops alone: a rank that stopped while the others
went on to the next gradient all-reduce would leave them waiting until the timeout. Every rank records its own loss
without raising (on the CPU too) and :meth:`LossGuard.check`, which every rank calls at the same steps, all-reduces
the ranks' four numbers (one tensor of ``world x 4``; :func:`agree`): every rank raises the same
:class:`NonFiniteLoss`, naming the first bad step and the rank(s) whose loss was non-finite there. That is the only
collective the guard adds, at the steps where it checks anyway. Between a bad step and the check the weights are
NaN on every rank (DDP averages a NaN gradient into every rank's gradient); the check before each checkpoint keeps
them out of ``last.ckpt``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

NOTHING = (float("nan"), -1.0, -1.0, 0.0)
"""A guard's state with no loss recorded: [last finite loss, its step, first bad step (-1: none), bad value]."""


class NonFiniteLoss(RuntimeError):
    """The training loss (or, ``what="weights"``, the weights after it) was NaN or inf; ``step`` is its optimizer
    step, ``last_finite`` (and ``last_finite_step``) the last finite loss before it (None: there was none).
    ``ranks`` (under DDP, of ``world``): the ranks whose loss was non-finite at ``step``; the last finite loss is
    that of the first of them."""

    def __init__(
        self,
        step: int,
        value: float,
        last_finite: float | None,
        last_finite_step: int | None,
        what: str = "loss",
        ranks: tuple[int, ...] = (),
        world: int = 1,
    ) -> None:
        self.step, self.value, self.last_finite, self.last_finite_step = step, value, last_finite, last_finite_step
        self.ranks, self.world = tuple(ranks), int(world)
        on = ""
        if self.ranks:
            names = ", ".join(map(str, self.ranks))
            on = f" on rank{'s' if len(self.ranks) > 1 else ''} {names} of {self.world}"
        before = (
            f"last finite loss {last_finite:.6g} at step {last_finite_step}"
            + (f" on rank {self.ranks[0]}" if self.ranks else "")
            if last_finite is not None
            else "no finite loss before it"
        )
        head = f"the training loss is {value} at step {step}{on}" if what == "loss" else f"the weights are {what}"
        super().__init__(f"{head} ({before})")


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def first_nonfinite(table: Tensor) -> NonFiniteLoss | None:
    """The error every rank raises from the ranks' states (``table``: one row per rank, columns as
    :data:`NOTHING`): the first bad step over all ranks, the ranks whose loss was non-finite at it, the value and
    last finite loss of the first of them; None when no rank recorded a non-finite loss."""
    rows = table.double().cpu().tolist()
    bad = [r for r, row in enumerate(rows) if row[2] >= 0]
    if not bad:
        return None
    step = min(rows[r][2] for r in bad)
    ranks = tuple(r for r in bad if rows[r][2] == step)
    last, last_step, _, value = rows[ranks[0]]
    before = (last, int(last_step)) if last_step >= 0 else (None, None)
    return NonFiniteLoss(int(step), value, *before, ranks=ranks, world=len(rows))


def agree(state: Tensor) -> Tensor:
    """Every rank's ``state`` (4 numbers), one row per rank in rank order: one all-reduce of a ``world x 4``
    tensor (on the current CUDA device for NCCL, else the CPU). Every rank must call it at the same point."""
    rank, size = world()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    table = torch.zeros(size, 4, dtype=torch.float64, device=device)
    table[rank] = state.to(device=device, dtype=torch.float64)
    dist.all_reduce(table)  # sum: each row is one rank's, the others add zeros
    return table


class LossGuard:
    """Tracks the training loss per step; raises :class:`NonFiniteLoss` at the first non-finite one (at once for a
    CPU loss of a single process, else at the next :meth:`check`, on every rank at once under DDP)."""

    def __init__(self, lazy: bool | None = None) -> None:
        self.lazy = lazy  # None: lazy on an accelerator, at once on the CPU
        self._last: tuple[float, int] | None = None  # at once: the last finite loss and its step
        self._bad: tuple[int, float] | None = None  # at once under DDP: the first bad step and value (not raised)
        self._state: Tensor | None = None  # lazy: as NOTHING, on the loss's device
        self._shared_last: tuple[float | None, int | None, int] | None = None  # DDP: agreed at the last check

    def update(self, loss: Tensor, step: int) -> None:
        """Record the (scalar) loss of optimizer step ``step``: checked at once on the CPU (single process), kept
        (on the device, no sync, when lazy) for the next :meth:`check` otherwise."""
        if not (self.lazy if self.lazy is not None else loss.device.type != "cpu"):
            value = float(loss.detach())
            if self._bad is not None:
                return
            if math.isfinite(value):
                self._last = (value, step)
            elif world()[1] > 1:
                self._bad = (step, value)  # raised by check(), on every rank at once
            else:
                raise NonFiniteLoss(step, value, *(self._last or (None, None)))
            return
        loss = loss.detach().double().reshape(())
        if self._state is None:
            self._state = torch.tensor(NOTHING, dtype=torch.float64, device=loss.device)
        s, finite = self._state, torch.isfinite(loss)
        first, keep = (~finite) & (s[2] < 0), finite & (s[2] < 0)
        step_t = torch.full((), float(step), dtype=torch.float64, device=loss.device)
        self._state = torch.stack(
            [
                torch.where(keep, loss, s[0]),
                torch.where(keep, step_t, s[1]),
                torch.where(first, step_t, s[2]),
                torch.where(first, loss, s[3]),
            ]
        )

    def state(self) -> Tensor:
        """This rank's record as four numbers (:data:`NOTHING` when none)."""
        if self._state is not None:
            return self._state
        last, last_step = self._last or (float("nan"), -1)
        bad_step, bad = self._bad or (-1, 0.0)
        return torch.tensor([last, float(last_step), float(bad_step), bad], dtype=torch.float64)

    def last_finite(self) -> tuple[float | None, int | None]:
        """The last finite loss and its step (None, None: none yet); one device sync when lazy."""
        if self._state is None:
            return self._last or (None, None)
        last, last_step = self._state[:2].tolist()
        return (last, int(last_step)) if last_step >= 0 else (None, None)

    def check(self) -> None:
        """Raise :class:`NonFiniteLoss` if a recorded loss was NaN or inf (one device sync when lazy). Under DDP
        every rank must call it at the same point: one all-reduce (:func:`agree`), and every rank raises the same
        error when any rank recorded a non-finite loss."""
        if world()[1] > 1:
            table = agree(self.state()).cpu()
            last, last_step = table[0, :2].tolist()
            self._shared_last = (last, int(last_step), 0) if last_step >= 0 else (None, None, 0)
            error = first_nonfinite(table)
            if error is not None:
                raise error
            return
        if self._state is None:
            return
        bad_step, bad = self._state[2:].tolist()
        if bad_step >= 0:
            raise NonFiniteLoss(int(bad_step), bad, *self.last_finite())

    def check_weights(self, parameters, step: int) -> None:
        """Raise :class:`NonFiniteLoss` if a parameter holds NaN or inf (a finite loss can still overflow its
        gradient); called before a checkpoint is written, so it costs one sync per checkpoint. Under DDP the weights
        are the same on every rank, so every rank raises; the message names rank 0's last finite loss as of the
        last :meth:`check`, so it is the same on every rank."""
        params = [p.detach() for p in parameters]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            what = f"not finite after step {step - 1}"
            if self._shared_last is not None:
                last, last_step, rank = self._shared_last
                raise NonFiniteLoss(step, float("nan"), last, last_step, what=what, ranks=(rank,), world=world()[1])
            raise NonFiniteLoss(step, float("nan"), *self.last_finite(), what=what)
