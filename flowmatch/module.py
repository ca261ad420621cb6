"""The LightningModule: flow-matching regression of v_theta(x_t, t) onto the interpolant's u_t."""

from __future__ import annotations

import copy
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn

from flowmatch.finite import LossGuard
from flowmatch.interpolants import Interpolant
from flowmatch.keys import metric
from flowmatch.losses import per_sample_loss
from flowmatch.streams import generator


class FlowMatchingModule(L.LightningModule):
    """Trains ``model`` (v_theta(x, t)) with the per-sample CFM loss of :mod:`flowmatch.losses`.

    Batches are coupled pairs ``(x0, x1)``; each step draws t ~ U(0, 1) and eps ~ N(0, I) and
    minimises the batch mean of l_i = (1/D) ||v(x_t, t) - u_t||^2. ``optimizer`` and
    ``scheduler`` are partials (Hydra ``_partial_``) taking the parameters / the optimizer;
    the scheduler is stepped every optimizer step.

    ``sampling_model``: the network used by :meth:`velocity` (sampling, evaluation, validation
    loss); the EMA callback sets it to its averaged copy. It is *not* a registered submodule (not
    in ``state_dict``/``parameters``; the EMA callback checkpoints it) but moves with ``.to()``.
    ``compile``: train through ``torch.compile(model)`` (built at the first training step; the
    parameters and ``state_dict`` keys stay those of ``model``). Off by default.

    A NaN or inf training loss raises :class:`flowmatch.finite.NonFiniteLoss` (every step on the CPU, at the
    logging steps on an accelerator or under DDP, and always before a checkpoint is written and at the end of
    training; under DDP on every rank at once: ``flowmatch/finite.py``).
    """

    def __init__(
        self,
        model: nn.Module,
        interpolant: Interpolant,
        optimizer: Callable,
        scheduler: Callable | None = None,
        log_every_n_steps: int = 50,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.interpolant = model, interpolant
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.log_every = max(1, int(log_every_n_steps))
        self.compile_model = bool(compile)
        self.sampling_model: nn.Module | None = None  # set by EMA to sample with averaged weights
        self._compiled: nn.Module | None = None
        self.loss_guard = LossGuard()

    # Plain attributes that bypass nn.Module.__setattr__: the EMA copy and the compiled wrapper must not
    # register as submodules, and Lightning sets ``_current_fx_name`` ~40 times per step, where the
    # generic path costs ~6% of a small-MLP training step (benchmarks/training_loop.py).
    _PLAIN_ATTRIBUTES = frozenset({"sampling_model", "_compiled", "_current_fx_name"})

    def __setattr__(self, name: str, value) -> None:
        if name in self._PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.sampling_model is not None and self.sampling_model is not self.model:
            self.sampling_model._apply(fn, *args, **kwargs)
        return self

    def train_model(self) -> nn.Module:
        """The network the training step calls: ``model``, or its ``torch.compile`` wrapper."""
        if not self.compile_model:
            return self.model
        if self._compiled is None:
            self._compiled = torch.compile(self.model)
        return self._compiled

    def load_ema_from_checkpoint(self, ckpt: dict) -> bool:
        """Sample with the EMA weights stored in a checkpoint by the EMA callback; False if it has none."""
        for state in (ckpt.get("callbacks") or {}).values():
            if isinstance(state, dict) and "ema_state_dict" in state:
                ema = copy.deepcopy(self.model).eval().requires_grad_(False)
                ema.load_state_dict(state["ema_state_dict"])
                self.sampling_model = ema.to(self.device)
                return True
        return False

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.model(x, t)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """The field used for sampling and evaluation (EMA weights when an EMA callback set them)."""
        return self.velocity_model()(x, t)

    def velocity_model(self) -> nn.Module:
        return self.sampling_model if self.sampling_model is not None else self.model

    def draw_t_eps(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """t ~ U(0, 1) per sample and eps ~ N(0, I) shaped like x0 (zeros when sigma = 0)."""
        t = torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype)
        return t, self.interpolant.sample_eps(x0)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x0, x1 = batch
        t, eps = self.draw_t_eps(x0)
        loss = per_sample_loss(self.train_model(), self.interpolant(x0, x1, t, eps)).mean()
        self.loss_guard.update(loss, self.global_step)
        # Logging every step costs more than a small MLP step; log at the logger's cadence. A CPU copy: Lightning
        # reads progress-bar values with .item() after *every* batch (the last logged one until the next), which on
        # a GPU tensor would synchronise the device each step; the copy synchronises once per log_every steps.
        if self.global_step % self.log_every == 0:
            self.loss_guard.check()
            self.log(metric("train/loss"), loss.detach().cpu(), prog_bar=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to write a checkpoint of weights trained on a non-finite loss, or not finite themselves (raises
        ``NonFiniteLoss``)."""
        self.loss_guard.check()
        self.loss_guard.check_weights(self.model.parameters(), self.global_step)

    def on_train_end(self) -> None:
        """Raise ``NonFiniteLoss`` for a non-finite loss recorded since the last check (lazy or DDP guard), so that
        no evaluation runs on the weights it left."""
        self.loss_guard.check()

    def _held_out_step(self, batch, prefix: str) -> None:
        x0, x1 = batch
        g = generator(0, "loss", device=x0.device)  # the same times and noise at every validation
        t = torch.rand(x0.shape[0], generator=g, device=x0.device, dtype=x0.dtype)
        eps = self.interpolant.sample_eps(x0, g)
        path = self.interpolant(x0, x1, t, eps)
        self.log(metric(f"{prefix}/loss"), per_sample_loss(self.velocity_model(), path).mean(), sync_dist=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._held_out_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._held_out_step(batch, "test")

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}
