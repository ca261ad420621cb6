"""Stop training at a non-finite loss, from the loss the step already has (no anomaly detection).

:class:`LossGuard` keeps, on the loss's device, the last finite loss, its step and the first step whose loss was
NaN or inf; updating them is three element-wise ops and never waits for the device. :meth:`LossGuard.check`
reads them (one device sync) and raises :class:`NonFiniteLoss`. A loss on the CPU is checked at once (reading it
costs nothing there). On an accelerator the training step checks at the logging steps (``log_every_n_steps``) and
the module before any checkpoint is written: a checkpoint never holds weights trained on a non-finite loss, the
reported step is exact, and training may run up to ``log_every_n_steps - 1`` steps past it before it stops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class NonFiniteLoss(RuntimeError):
    """The training loss (or, ``what="weights"``, the weights after it) was NaN or inf; ``step`` is its optimizer
    step, ``last_finite`` (and ``last_finite_step``) the last finite loss before it (None: there was none)."""

    def __init__(
        self,
        step: int,
        value: float,
        last_finite: float | None,
        last_finite_step: int | None,
        what: str = "loss",
    ) -> None:
        self.step, self.value, self.last_finite, self.last_finite_step = step, value, last_finite, last_finite_step
        before = (
            f"last finite loss {last_finite:.6g} at step {last_finite_step}"
            if last_finite is not None
            else "no finite loss before it"
        )
        head = f"the training loss is {value} at step {step}" if what == "loss" else f"the weights are {what}"
        super().__init__(f"{head} ({before})")


class LossGuard:
    """Tracks the training loss per step; raises :class:`NonFiniteLoss` at the first non-finite one (at once for a
    CPU loss, at the next :meth:`check` for a loss on an accelerator)."""

    def __init__(self, lazy: bool | None = None) -> None:
        self.lazy = lazy  # None: lazy on an accelerator, at once on the CPU
        self._last: tuple[float, int] | None = None  # at once: the last finite loss and its step
        self._state: Tensor | None = None  # lazy: [last finite loss, its step, first bad step (-1), bad value]

    def update(self, loss: Tensor, step: int) -> None:
        """Record the (scalar) loss of optimizer step ``step``: checked at once on the CPU, kept on the device
        (no sync) on an accelerator."""
        if not (self.lazy if self.lazy is not None else loss.device.type != "cpu"):
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(step, value, *(self._last or (None, None)))
            self._last = (value, step)
            return
        loss = loss.detach().double().reshape(())
        if self._state is None:
            self._state = torch.tensor([float("nan"), -1.0, -1.0, 0.0], dtype=torch.float64, device=loss.device)
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

    def last_finite(self) -> tuple[float | None, int | None]:
        """The last finite loss and its step (None, None: none yet); one device sync when lazy."""
        if self._state is None:
            return self._last or (None, None)
        last, last_step = self._state[:2].tolist()
        return (last, int(last_step)) if last_step >= 0 else (None, None)

    def check(self) -> None:
        """Raise :class:`NonFiniteLoss` if a recorded loss was NaN or inf (one device sync when lazy)."""
        if self._state is None:
            return
        bad_step, bad = self._state[2:].tolist()
        if bad_step >= 0:
            raise NonFiniteLoss(int(bad_step), bad, *self.last_finite())

    def check_weights(self, parameters, step: int) -> None:
        """Raise :class:`NonFiniteLoss` if a parameter holds NaN or inf (a finite loss can still overflow its
        gradient); called before a checkpoint is written, so it costs one sync per checkpoint."""
        params = [p.detach() for p in parameters]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise NonFiniteLoss(step, float("nan"), *self.last_finite(), what=f"not finite after step {step - 1}")
