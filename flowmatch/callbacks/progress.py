"""Training progress as lines: ``step 600/2000 (30%) · loss 0.0123 · 85.1 steps/s · eta 0:16``.

Config node ``progress`` (``conf/train.yaml``). ``mode``: ``bar`` (Lightning's live bar), ``lines`` (one line every
``every_s`` seconds: sweeps whose jobs run in parallel, logs, CI), ``none`` (neither), or ``auto`` (a bar for a
single run on an interactive terminal, lines otherwise: :meth:`ProgressLines.resolve`). The lines are always kept
in the run's log file (``train.log``); they reach the terminal in ``lines`` mode only.
"""

from __future__ import annotations

import logging
import time

import lightning as L

from flowmatch.keys import metric

MODES = ("auto", "bar", "lines", "none")
LOG = logging.getLogger("flowmatch.progress")


def _clock(seconds: float) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour)."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLines(L.Callback):
    """Logs a progress line at most every ``every_s`` seconds of training and one at its end (global rank zero);
    at INFO (terminal and log file) when ``mode`` resolves to ``lines``, else at DEBUG (log file only)."""

    def __init__(self, mode: str = "auto", every_s: float = 10.0) -> None:
        if mode not in MODES:
            raise ValueError(f"progress.mode={mode!r} is not one of {list(MODES)}")
        if not every_s > 0:
            raise ValueError(f"progress.every_s={every_s!r} must be > 0 (seconds between progress lines)")
        self.mode, self.every_s = mode, float(every_s)
        self._start = self._last = 0.0
        self._first_step = 0

    def resolve(self, interactive: bool) -> str:
        """Fix ``auto``: ``bar`` when ``interactive`` (a single run whose terminal shows a live bar), else
        ``lines``. Returns the mode."""
        if self.mode == "auto":
            self.mode = "bar" if interactive else "lines"
        return self.mode

    @property
    def bar(self) -> bool:
        """Whether Lightning's live progress bar should be on (``trainer.enable_progress_bar``)."""
        return self.mode == "bar"

    def _say(self, message: str) -> None:
        LOG.log(logging.INFO if self.mode == "lines" else logging.DEBUG, message)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._first_step = trainer.global_step
        if trainer.is_global_zero:
            since = f" from step {trainer.global_step}" if trainer.global_step else ""
            self._say(f"training: {self._total(trainer)} steps{since}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if not trainer.is_global_zero or now - self._last < self.every_s:
            return
        self._last = now
        self._say(self.line(trainer, now))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        elapsed = time.perf_counter() - self._start
        done = trainer.global_step - self._first_step
        rate = f" ({done / elapsed:.1f} steps/s)" if elapsed > 0 else ""
        self._say(f"trained {done} steps in {_clock(elapsed)}{rate}{self._loss(trainer)}")

    @staticmethod
    def _total(trainer: L.Trainer) -> int:
        return (
            int(trainer.max_steps)
            if trainer.max_steps and trainer.max_steps > 0
            else trainer.estimated_stepping_batches
        )

    @staticmethod
    def _loss(trainer: L.Trainer) -> str:
        loss = trainer.callback_metrics.get(metric("train/loss"))
        return f" · loss {float(loss):.4g}" if loss is not None else ""

    def line(self, trainer: L.Trainer, now: float) -> str:
        """``step k/n (p%) · loss · steps/s · eta``: the rate since this fit started, the loss last logged."""
        step, total = trainer.global_step, self._total(trainer)
        rate = (step - self._first_step) / max(now - self._start, 1e-9)
        eta = f" · eta {_clock((total - step) / rate)}" if rate > 0 and total >= step else ""
        pct = f" ({100 * step / total:.0f}%)" if total > 0 else ""
        return f"step {step}/{total}{pct}{self._loss(trainer)} · {rate:.1f} steps/s{eta}"
