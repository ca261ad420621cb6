"""The throughput callback times training batches only: work after the last batch (final probes, figures, the last
checkpoint) is not counted."""

from __future__ import annotations

import functools
import time

import lightning as L
import torch

from flowmatch.callbacks.throughput import Throughput
from flowmatch.couplings import IndependentCoupling
from flowmatch.data import GaussianDataModule
from flowmatch.interpolants import CFM
from flowmatch.models.mlp import MLP
from flowmatch.module import FlowMatchingModule


class _SlowEnd(L.Callback):
    """Sleeps in on_train_end (as the final gradient-variance probes do) and at epoch end (the last checkpoint)."""

    def on_train_epoch_end(self, trainer, pl_module):
        time.sleep(0.5)

    def on_train_end(self, trainer, pl_module):
        time.sleep(0.5)


class _Clock(L.Callback):
    """An independent clock over the same window: end of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def test_throughput_counts_training_batches_not_the_work_after_them(tmp_path):
    torch.manual_seed(0)
    dm = GaussianDataModule(IndependentCoupling(), dim=2, batch_size=16)
    module = FlowMatchingModule(MLP(2), CFM(0.0), functools.partial(torch.optim.Adam, lr=1e-3))
    thr, clock = Throughput(warmup_steps=5), _Clock(5)
    trainer = L.Trainer(
        max_steps=30,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[_SlowEnd(), clock, thr],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    r = thr.result
    assert r["steps"] == 25 and r["batch_size"] == 16
    assert r["seconds"] < 0.5  # the sleeps after the last batch are excluded
    assert abs(r["seconds"] - (clock.end - clock.start)) < 0.05 + 0.2 * r["seconds"]
    assert r["steps_per_s"] == 25 / r["seconds"] and (tmp_path / "throughput.json").exists()
