"""Sample grids during training: ``<run dir>/samples/step_XXXXXX.png`` every ``every_n_steps`` steps.

Each grid integrates a fixed batch of ``n_samples`` sources x0 ~ p0 (drawn once with ``seed``) through the
current field ``pl_module.velocity`` (EMA weights when the EMA callback is on) with fixed-step Euler,
x_{k+1} = x_k + h v(x_k, t_k), h = 1 / steps (or the given ``solver``), in eval mode.

For finite couplings (``datamodule.coupling.pairs`` is set: fixed, shuffled_ot, rotated with n_pairs, reflow)
a second grid, ``pairs_step_XXXXXX.png``, has four rows over the first ``n_pairs_shown`` training pairs:
training source x0_i -> integrated endpoint Phi(x0_i) -> training partner x1_i -> OT partner T_OT(x0_i)
(:func:`flowmatch.evaluation.ot_partners`: the discrete OT assignment over the whole training pair set).

Images in [-1, 1] are shown as (x + 1) / 2 clipped to [0, 1] (noise rows saturate), enlarged by an integer
factor to at least ``min_size`` pixels. The PNG is also sent to
every logger with a ``log_image`` method (WandbLogger) under the key ``samples``; other loggers are skipped.
A grid is also written at the end of training. Non-image data (event shape not (C, H, W)) is skipped with
a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from flowmatch.evaluation import ot_partners
from flowmatch.sampling import Solver
from flowmatch.streams import generator

__all__ = ["SampleGrid"]


class SampleGrid(L.Callback):
    """Writes sample grids (and pair grids for finite couplings) every ``every_n_steps`` (module docstring)."""

    def __init__(
        self,
        every_n_steps: int = 500,
        n_samples: int = 64,
        steps: int = 20,
        nrow: int = 8,
        n_pairs_shown: int = 8,
        seed: int = 0,
        dirname: str = "samples",
        solver: Solver | None = None,
        log_key: str = "samples",
        min_size: int = 32,
    ) -> None:
        if int(every_n_steps) < 1 or int(n_samples) < 1 or int(n_pairs_shown) < 1:
            raise ValueError("callbacks.samples: every_n_steps, n_samples and n_pairs_shown must be >= 1")
        self.every, self.n_samples, self.nrow = int(every_n_steps), int(n_samples), int(nrow)
        self.n_pairs_shown, self.seed, self.dirname, self.log_key = int(n_pairs_shown), int(seed), dirname, log_key
        self.solver = solver if solver is not None else Solver("euler", steps=int(steps))
        self.min_size = int(min_size)
        self.rows: dict[str, Tensor] | None = None  # fixed inputs (CPU)
        self.enabled = True
        self.written: list[Path] = []
        self._last_written = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fix the inputs (after a resume restored the training pairs)."""
        dm = trainer.datamodule
        dm.setup("fit")
        if len(dm.p0.shape) != 3:
            warnings.warn(
                f"callbacks.samples: data of shape {dm.p0.shape} are not images (C, H, W); no grids", stacklevel=2
            )
            self.enabled = False
            return
        setup = dm.eval_setup()  # CPU copies of the ends and the training pairs
        # Its own random stream: seed alone would redraw the first training sources of a fixed coupling.
        g = generator(self.seed, "samples")
        self.rows = {"noise": setup.p0.sample(self.n_samples, g).cpu()}
        if setup.pairs is not None:
            k = min(self.n_pairs_shown, len(setup.pairs[0]))
            x_ot = ot_partners(setup, setup.pairs[0])
            self.rows.update(x0=setup.pairs[0][:k].cpu(), x1=setup.pairs[1][:k].cpu())
            if x_ot is not None:
                self.rows["ot"] = x_ot[:k].cpu()

    def _run_dir(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.dirname

    @torch.no_grad()
    def _integrate(self, pl_module: L.LightningModule, x0: Tensor) -> Tensor:
        net = pl_module.velocity_model()
        was_training = net.training
        net.eval()
        try:
            return self.solver.integrate(pl_module.velocity, x0.to(pl_module.device)).x1.float().cpu()
        finally:
            net.train(was_training)

    def grid(self, pl_module: L.LightningModule, kind: str = "pairs") -> Tensor:
        """The current grid image (3, H, W) in [0, 1]: ``samples`` from the fixed noise batch, or
        ``pairs`` (rows source, endpoint, partner, OT partner; finite couplings only)."""
        if kind == "samples":
            images, nrow = self._integrate(pl_module, self.rows["noise"]), self.nrow
        else:
            x1_hat = self._integrate(pl_module, self.rows["x0"])
            rows = [self.rows["x0"], x1_hat, self.rows["x1"]] + ([self.rows["ot"]] if "ot" in self.rows else [])
            images, nrow = torch.cat(rows), len(self.rows["x0"])
        scale = -(-self.min_size // images.shape[-1])  # nearest-neighbour upscaling of small images (digits)
        if scale > 1:
            images = images.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        return make_grid(((images + 1) / 2).clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        step = trainer.global_step
        if not (self.enabled and trainer.is_global_zero) or step == self._last_written or self.rows is None:
            return None
        self._last_written = step
        kinds = ["samples"] + (["pairs"] if "x1" in self.rows else [])
        for kind in kinds:
            path = self._run_dir(trainer) / f"{'pairs_' if kind == 'pairs' else ''}step_{step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(self.grid(pl_module, kind), str(path))
            self.written.append(path)
            key = self.log_key if kind == "samples" else f"{self.log_key}_pairs"
            for logger in trainer.loggers:
                if callable(getattr(logger, "log_image", None)):
                    logger.log_image(key=key, images=[str(path)], step=step)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)
