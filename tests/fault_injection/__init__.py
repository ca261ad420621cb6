"""Test-only callbacks that make a fault happen at a known point (importable from the repo root as
``tests.fault_injection``, which train.py subprocesses of the tests run in)."""

from __future__ import annotations

import time

import lightning as L


class PauseAtStep(L.Callback):
    """Sleep ``seconds`` once the trainer has finished step ``step`` (and its checkpoint), so that a test can
    SIGKILL the process there."""

    def __init__(self, step: int, seconds: float = 120.0, flag: str | None = None) -> None:
        self.step, self.seconds, self.flag = int(step), float(seconds), flag

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            if self.flag:
                open(self.flag, "w").close()
            time.sleep(self.seconds)


class RaiseAtStep(L.Callback):
    """Raise ``RuntimeError(message)`` once the trainer has finished step ``step``: a fault at run time that is
    not a user's mistake (like CUDA running out of memory)."""

    def __init__(self, step: int, message: str = "injected fault") -> None:
        self.step, self.message = int(step), message

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(self.message)


class NonFiniteOnRank(L.Callback):
    """Make the training loss ``value`` (nan or inf) on global rank ``rank`` alone at optimizer step ``step``: the
    model's output is shifted by ``value`` for that one batch (as if that rank's batch held a NaN or inf), so its
    gradient is non-finite too and reaches the other ranks through DDP's gradient all-reduce. ``rank0_exit_delay_s``:
    rank 0 lingers that long when training stops on an exception, longer than the 5 s poll of Lightning's launcher,
    which SIGKILLs rank 0 once another rank has exited with a non-zero status."""

    def __init__(self, step: int, rank: int = 1, value: str = "nan", rank0_exit_delay_s: float = 0.0) -> None:
        self.step, self.rank, self.value = int(step), int(rank), float(value)
        self.rank0_exit_delay_s = float(rank0_exit_delay_s)
        self._handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            self._handle = pl_module.model.register_forward_hook(lambda module, args, out: out + self.value)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        if trainer.global_rank == 0:
            time.sleep(self.rank0_exit_delay_s)
