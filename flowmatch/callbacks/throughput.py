"""Training throughput: steps/s and samples/s after ``warmup_steps`` (``callbacks=throughput``).

Times the optimizer steps from the end of step ``warmup_steps`` (compilation, cuDNN autotuning and the
first allocations are excluded) to the end of the last training batch: steps/s = (N - warmup) / (t_N - t_warmup),
samples/s = steps/s * batch size (per process). Work done after the last batch (``on_train_epoch_end`` /
``on_train_end`` hooks: the final gradient-variance probes and figures, the last checkpoint) is not training
throughput and is not counted; probes and checkpoints *during* training are. On CUDA the end is a CUDA event
recorded at every batch end (no synchronisation per step), read once at the end of training. On CUDA it also
records the peak GPU memory of the process (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``, GiB,
since the start of training). Prints one line ``flowmatch: throughput ...`` and writes ``throughput.json`` into the
run dir (global rank 0).

Why not Lightning's ``ThroughputMonitor``: it logs windowed rates to the loggers and needs a ``batch_size_fn``;
this callback measures one rate over the whole run after a warm-up, synchronising CUDA, and writes it to a file
that benchmark scripts read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

from flowmatch.terminal import say

__all__ = ["Throughput"]


class Throughput(L.Callback):
    """Steps/s and samples/s of training after ``warmup_steps`` (module docstring)."""

    def __init__(self, warmup_steps: int = 20) -> None:
        self.warmup = max(0, int(warmup_steps))
        self.t0: float | None = None
        self.step0 = self.step1 = 0
        self.batch_size = 0
        self.result: dict | None = None
        self._t1 = 0.0
        self._events: tuple | None = None  # CUDA: (start, end) events

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.batch_size = len(batch[0])
        if self.t0 is not None:  # mark the end of this batch (CUDA: an event, no synchronisation)
            self.step1 = trainer.global_step
            if self._events is not None:
                self._events[1].record()
            else:
                self._t1 = time.perf_counter()
        elif trainer.global_step >= self.warmup:  # the clock starts here, once
            self.t0, self.step0 = time.perf_counter(), trainer.global_step
            if pl_module.device.type == "cuda":
                self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                self._events[0].record()

    def _seconds(self) -> float:
        """Seconds from the start of the clock to the end of the last training batch."""
        if self._events is None:
            return self._t1 - self.t0
        self._events[1].synchronize()
        return self._events[0].elapsed_time(self._events[1]) / 1000.0

    def on_train_end(self, trainer, pl_module) -> None:
        if self.t0 is None or self.step1 <= self.step0:
            say(f"flowmatch: throughput not measured ({trainer.global_step} steps <= warmup {self.warmup})")
            return
        dt, n = self._seconds(), self.step1 - self.step0
        self.result = {
            "steps": n,
            "seconds": dt,
            "steps_per_s": n / dt,
            "samples_per_s": n * self.batch_size / dt,
            "batch_size": self.batch_size,
            "device": str(pl_module.device),
            "precision": str(trainer.precision),
        }
        if pl_module.device.type == "cuda":
            self.result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            self.result["max_memory_reserved_gib"] = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
        if trainer.is_global_zero:
            say(
                f"flowmatch: throughput {n / dt:.2f} steps/s, {n * self.batch_size / dt:.1f} samples/s "
                f"({n} steps after {self.step0} warm-up steps, batch {self.batch_size}, {pl_module.device}, "
                f"precision {trainer.precision})"
            )
            Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer.default_root_dir) / "throughput.json").write_text(json.dumps(self.result, indent=2) + "\n")
