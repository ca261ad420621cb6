"""The two training loops the benchmarks compare, on one run built from the project's configs.

``make_run(overrides)`` composes ``conf/train.yaml`` as ``train.py`` does and builds the datamodule, module (model,
interpolant, optimizer, scheduler), the chosen EMA callback and the trainer settings. Then, on the same objects:

- :func:`lightning_rate`: steps/s of ``trainer.fit`` with the run's trainer config (precision as asked, the run's
  callbacks plus a clock), timed from the end of step ``warmup`` to the end of the last training batch;
- :func:`bare_rate`: steps/s of a plain PyTorch loop doing the same work per step: a batch from the same training
  stream, t and eps, the per-sample loss (``FlowMatchingModule.train_model``: compiled when ``module.compile``),
  backward, gradient clipping when the trainer clips, the optimizer and scheduler step, the EMA update when the
  run has EMA; timed over the same steps.

Both synchronise CUDA only at the start and at the end of the timed window.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowmatch.callbacks.ema import EMA, ema_update  # noqa: E402
from flowmatch.losses import per_sample_loss  # noqa: E402


@dataclass
class Run:
    """One composed config and the objects built from it (shared by both loops)."""

    cfg: object
    datamodule: object
    module: object
    callbacks: list
    device: torch.device

    @property
    def clip(self) -> float | None:
        return self.cfg.trainer.get("gradient_clip_val")

    @property
    def ema(self) -> EMA | None:
        return next((cb for cb in self.callbacks if isinstance(cb, EMA)), None)


def make_run(overrides: list[str], device: torch.device) -> Run:
    """Compose ``train`` with ``overrides`` and build it like train.py (``flowmatch.entry.build``)."""
    from hydra import compose, initialize_config_dir

    from flowmatch.entry import build, instantiate_all

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(int(cfg.seed))
    datamodule, module, _ = build(cfg)
    return Run(cfg, datamodule, module, instantiate_all(cfg.callbacks, "callbacks"), device)


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Clock(L.Callback):
    """From the end of step ``warmup`` to the end of the last batch (synchronising CUDA at both ends only)."""

    def __init__(self, warmup: int, last: int) -> None:
        self.warmup, self.last, self.start, self.end = warmup, last, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = _sync(pl_module.device)
        elif trainer.global_step == self.last:
            self.end = _sync(pl_module.device)


def lightning_rate(run: Run, precision: str, steps: int, warmup: int) -> float:
    """Steps/s of ``trainer.fit`` (the run's trainer config, ``precision``, its callbacks, no logger/checkpoints)."""
    from hydra.utils import instantiate

    clock = _Clock(warmup, warmup + steps)
    trainer = instantiate(
        run.cfg.trainer,
        precision=precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[*run.callbacks, clock],
        default_root_dir=None,
    )
    trainer.fit(run.module, datamodule=run.datamodule)
    return steps / (clock.end - clock.start)


def bare_rate(run: Run, precision: str, steps: int, warmup: int) -> float:
    """Steps/s of the plain PyTorch loop (module docstring) on the run's objects."""
    device, module = run.device, run.module.to(run.device).train()
    out = module.configure_optimizers()
    opt, sched = (out["optimizer"], out["lr_scheduler"]["scheduler"]) if isinstance(out, dict) else (out, None)
    ema = run.ema
    ema_model = None
    if ema is not None:  # the callback's copy when Lightning made one, else a copy made here
        ema_model = (ema.ema_model or copy.deepcopy(module.model).requires_grad_(False)).to(device)
    bf16 = precision.startswith("bf16")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    batches = iter(run.datamodule.train_dataloader())
    start = None
    for i in range(warmup + steps):
        if i == warmup:
            start = _sync(device)
        x0, x1 = (x.to(device, non_blocking=True) for x in next(batches))
        t, eps = module.draw_t_eps(x0)
        with autocast:
            loss = per_sample_loss(module.train_model(), module.interpolant(x0, x1, t, eps)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if run.clip:
            torch.nn.utils.clip_grad_norm_(module.model.parameters(), float(run.clip))
        opt.step()
        if sched is not None:
            sched.step()
        if ema_model is not None:
            ema_update(ema_model, module.model, ema.current_decay())
    return steps / (_sync(device) - start)
