"""Exponential moving average (EMA) of the model weights, used for sampling and evaluation.

After every optimizer step n = 1, 2, ... each floating-point parameter of the EMA copy is updated as

    theta_ema <- d_n theta_ema + (1 - d_n) theta,   d_n = decay            (warmup: false)
                                                    d_n = min(decay, (1 + n) / (10 + n))   (warmup: true)

(the warm-up is TensorFlow's ``ExponentialMovingAverage(num_updates=n)``: short runs are not dominated by the
initial weights). Buffers (and integer tensors) are copied. The copy starts equal to the model at fit start.

The callback sets ``pl_module.sampling_model`` to the copy, so ``pl_module.velocity`` (samples, validation
loss, end-of-training evaluation) uses the EMA weights. Its state (the EMA weights and n) is saved in the
checkpoint under ``callbacks["EMA"]["ema_state_dict"]`` and restored on resume; ``evaluate.py`` loads it
with ``FlowMatchingModule.load_ema_from_checkpoint`` (``use_ema=true``, the default).
Not supported with FSDP (the copy would hold sharded parameters).

Why not ``torch.optim.swa_utils.AveragedModel`` or Lightning's ``EMAWeightAveraging``: neither has the warm-up
schedule above, and both store the average under their own state-dict layout, whereas this callback keeps a plain
copy of the network whose ``state_dict`` ``evaluate.py`` loads as is; the update itself is one fused
``torch._foreach_lerp_``.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch import nn

__all__ = ["EMA", "ema_update"]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """theta_ema <- decay theta_ema + (1 - decay) theta for floating parameters; copy everything else."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    pairs = [(e, m) for e, m in zip(e_params, m_params) if e.dtype.is_floating_point]
    if pairs:
        e, m = zip(*pairs)
        torch._foreach_lerp_(list(e), list(m), 1.0 - float(decay))  # e + (1 - d)(m - e)
    for e, m in zip(e_params, m_params):
        if not e.dtype.is_floating_point:
            e.copy_(m)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)


class EMA(L.Callback):
    """Keeps ``ema_model``, an EMA of ``pl_module.model`` (see the module docstring for the update)."""

    def __init__(self, decay: float = 0.999, warmup: bool = False) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.ema_model: nn.Module | None = None
        self.num_updates = 0
        self._pending: dict | None = None
        self._last_step = -1

    def current_decay(self) -> float:
        """d_n for the next update n = num_updates + 1."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema_model is None:
            self.ema_model = copy.deepcopy(pl_module.model).eval().requires_grad_(False)
        if self._pending is not None:
            self._load(self._pending)
        self.ema_model.to(pl_module.device)
        pl_module.sampling_model = self.ema_model
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._last_step:  # no optimizer step (gradient accumulation)
            return
        self._last_step = trainer.global_step
        ema_update(self.ema_model, pl_module.model, self.current_decay())
        self.num_updates += 1

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.ema_model is None:
            return {}
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "ema_state_dict": self.ema_model.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if "ema_state_dict" not in state_dict:
            return
        if self.ema_model is None:  # restored before on_fit_start: apply once the copy exists
            self._pending = state_dict
        else:
            self._load(state_dict)

    def _load(self, state: dict) -> None:
        self.ema_model.load_state_dict(state["ema_state_dict"])
        self.num_updates = int(state.get("num_updates", 0))
        self._pending = None
