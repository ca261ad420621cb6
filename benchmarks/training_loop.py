"""Steps per second of the Lightning training loop vs a bare PyTorch loop (same MLP, batch, data).

Both loops train the same architecture (MLP 3x256, 2-D data, batch 256, Adam, CFM loss on
independent Gaussian pairs, the same PairStream), measured alternately in one process
(1 torch thread) so machine noise hits both; prints the ratio lightning/bare of steps per second.
Run: ``.venv/bin/python benchmarks/training_loop.py [--steps N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings

import lightning as L
import torch

from flowmatch.couplings import IndependentCoupling
from flowmatch.data import GaussianDataModule
from flowmatch.interpolants import CFM
from flowmatch.losses import per_sample_loss
from flowmatch.models.mlp import MLP
from flowmatch.module import FlowMatchingModule

warnings.filterwarnings("ignore")


BATCH = 256


def make_module(seed: int) -> tuple[FlowMatchingModule, GaussianDataModule]:
    torch.manual_seed(seed)
    dm = GaussianDataModule(IndependentCoupling(), dim=2, batch_size=BATCH, seed=seed)
    dm.setup()
    module = FlowMatchingModule(MLP(2), CFM(0.05), functools.partial(torch.optim.Adam, lr=1e-3))
    return module, dm


def bare(steps: int) -> float:
    module, dm = make_module(0)
    opt = module.configure_optimizers()
    batches = iter(dm.train_dataloader())
    start = time.perf_counter()
    for _ in range(steps):  # same span as the Lightning clock: data loading included
        x0, x1 = next(batches)
        t, eps = module.draw_t_eps(x0)
        loss = per_sample_loss(module.model, module.interpolant(x0, x1, t, eps)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - start)


class _Clock(L.Callback):
    """Times the loop itself: from the first batch to the end of the last (no fit() start-up)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def lightning(steps: int) -> float:
    module, dm = make_module(0)
    clock = _Clock()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=dm)
    return (steps - 1) / (clock.end - clock.start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=256, help="batch size (the issue's setting: 256)")
    args = ap.parse_args()
    global BATCH
    BATCH = args.batch
    torch.set_num_threads(1)
    print(f"MLP 3x256 on 2-D data, batch {BATCH}, 1 thread, {args.steps} steps per measurement")
    bare(100), lightning(100)  # warm-up
    ratios = []
    for r in range(args.rounds):
        b, lt = bare(args.steps), lightning(args.steps)
        ratios.append(lt / b)
        print(f"round {r}: bare {b:7.1f} steps/s   lightning {lt:7.1f} steps/s   ratio {lt / b:.3f}")
    ratios.sort()
    print(
        f"lightning/bare steps-per-second ratio: median {ratios[len(ratios) // 2]:.3f} "
        f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f}; goal >= 0.95)"
    )


if __name__ == "__main__":
    main()
