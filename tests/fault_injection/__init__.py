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
