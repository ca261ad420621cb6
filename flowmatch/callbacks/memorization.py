"""MemorizationCallback: the memorization alarm during training (``callbacks=memorization``).

Every ``every_n_steps`` optimizer steps (and at the start and the end of training) it measures, with
:mod:`flowmatch.memorization`, the per-time-bin loss and gradient variance of the training weights on a fixed
subset of training pairs and on the coupling's held-out pairs (``coupling.n_holdout``; same times and noise for
both), their held-out / train ratios, and the pair accuracy of the integrated training and held-out sources
(sampling weights, EMA when on) with each of ``euler_steps`` Euler steps. It logs ``mem/...`` to every logger,
appends one row per probe to ``memorization.csv`` (:func:`flowmatch.memorization.probe_row`; opened, appended,
flushed and closed per probe, so a crash loses no written row) and draws ``memorization.png`` at the end
(``python -m flowmatch.plots.memorization --run RUN_DIR`` redraws it; loggers that take images get it as
``mem/figure``).

The alarm: the signal is gap(S) = mean over the bins inside ``signal_t`` of log10(S_held-out / S_train), S the
loss or the gradient variance (``signal``). It is defined for every coupling: a coupling that draws afresh
gets a fixed draw of training-like pairs, and then gap ~ 0 whatever the model. When the signal is >=
``threshold`` at ``patience`` consecutive probes, one line ``flowmatch: WARNING: memorization alarm at step S:
...`` names the step and the evidence, and ``mem/alarm_step`` = S goes to metrics.json (absent when there was
no alarm; ``mem/probes`` and ``mem/time_share`` are there whenever the callback ran). The defaults and their
calibration are in ``conf/callbacks/memorization.yaml``.

Cost: ``mem/time_share`` = time spent in this callback / training wall time (from the first probe to the end of
training, summed over resumed segments), in metrics.json and, cumulatively, in the CSV (``callback_s``,
``wall_s``). Global rank zero measures and writes (no collectives; the other ranks go on). No effect on
training: nothing is drawn from the training stream or the global random state (restored anyway), the
weights and their ``.grad`` are untouched, and every module's train/eval mode is restored.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import lightning as L
import torch

from flowmatch import memorization as mem
from flowmatch.callbacks.media import log_image, sigma_caption
from flowmatch.gradvar import TrainModeGuard, bin_edges
from flowmatch.keys import media_key, mem_key, metric
from flowmatch.streams import generator
from flowmatch.terminal import say

__all__ = ["MemorizationCallback"]
_KEY = "callbacks.memorization"


class MemorizationCallback(L.Callback):
    """The memorization alarm (module docstring); settings under ``callbacks.memorization``."""

    def __init__(
        self,
        every_n_steps: int = 250,
        probe_size: int = 250,
        bins=10,
        euler_steps=(1, 7, 21),
        signal: str = "grad_var",
        threshold: float = 1.0,
        patience: int = 3,
        signal_t=(0.1, 0.9),
        method: str = "auto",
        chunk_size: int = 256,
        seed: int = 0,
        filename: str = "memorization.csv",
        plot: bool = True,
    ) -> None:
        if signal not in mem.SIGNALS:
            raise ValueError(f"{_KEY}.signal must be one of {list(mem.SIGNALS)}, got {signal!r}")
        if isinstance(every_n_steps, bool) or int(every_n_steps) < 1:
            raise ValueError(f"{_KEY}.every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        steps = [int(k) for k in euler_steps]
        if not steps or min(steps) < 1:
            raise ValueError(f"{_KEY}.euler_steps must be a non-empty list of integers >= 1, got {list(euler_steps)}")
        self.edges = bin_edges(bins)
        if isinstance(probe_size, bool) or int(probe_size) % (self.edges.numel() - 1):
            raise ValueError(
                f"{_KEY}.probe_size={probe_size} must be a multiple of the {self.edges.numel() - 1} bins (an equal "
                f"count per bin)"
            )
        self.mask = mem.signal_bins(self.edges, signal_t)
        self.alarm = mem.Alarm(threshold, patience)
        self.every, self.probe_size, self.euler_steps, self.signal = int(every_n_steps), int(probe_size), steps, signal
        self.method, self.chunk_size, self.seed = method, int(chunk_size), int(seed)
        self.filename, self.plot = filename, bool(plot)
        self.probe: mem.MemProbe | None = None
        self.last_step, self.probes, self.last_row = -1, 0, None
        self.callback_s = self.wall_before_s = 0.0
        self.t0: float | None = None

    def validate(self, datamodule, module) -> None:
        """Fail before training when the coupling has no held-out pairs (or too few for the bins)."""
        if self.probe is None:
            mem.build_probe(datamodule.coupling, module.interpolant, self.edges, self.probe_size, torch.Generator())

    # --- measurement ----------------------------------------------------------------------------
    def _record(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self.last_step or not trainer.is_global_zero:
            return
        start = time.perf_counter()
        device = pl_module.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if self.probe is None:  # after the checkpoint restored the coupling's pairs
                coupling = trainer.datamodule.coupling
                g = generator(self.seed, "memprobe")
                self.probe = mem.build_probe(coupling, pl_module.interpolant, self.edges, self.probe_size, g)
            with TrainModeGuard(pl_module), torch.inference_mode(False), torch.enable_grad():
                stats = mem.measure(
                    pl_module.model,
                    pl_module.velocity,
                    self.probe.to(device),
                    self.edges,
                    self.euler_steps,
                    self.method,
                    self.chunk_size,
                )
        value = stats.gap(mem.SIGNALS[self.signal], self.mask)
        raised = self.alarm.update(step, value)
        row = mem.probe_row(step, stats, self.signal, self.mask, self.alarm)
        self.last_step, self.probes, self.last_row = step, self.probes + 1, row
        self.callback_s += time.perf_counter() - start
        row = {"wall_s": self.wall_s(), "callback_s": self.callback_s, **row}
        self._append(Path(trainer.default_root_dir) / self.filename, row)
        self._log(trainer, step, stats, row)
        if raised:
            say(
                f"flowmatch: WARNING: memorization alarm at step {step}: signal >= threshold at "
                f"{self.alarm.patience} consecutive probes: {self.evidence(row)}",
            )

    def evidence(self, row: dict) -> str:
        """One line of evidence: the signal and threshold, both ratios as factors, pair accuracy near 7 steps."""
        k = min(self.euler_steps, key=lambda s: abs(s - 7))
        return (
            f"{self.signal} gap {row['signal']:.2f} decades (threshold {self.alarm.threshold:g}; held-out/train "
            f"loss x{10 ** row['loss_gap']:.3g}, gradient variance x{10 ** row['var_gap']:.3g}, t in "
            f"{self._t_range()}); pair accuracy euler{k}: training {row[f'pair_acc@euler{k}']:.2f}, held-out "
            f"{row[f'holdout_pair_acc@euler{k}']:.2f}"
        )

    def _t_range(self) -> str:
        lo, hi = self.edges[:-1][self.mask], self.edges[1:][self.mask]
        return f"[{float(lo.min()):g}, {float(hi.max()):g}]"

    def wall_s(self) -> float:
        """Training wall time so far (this segment since the first probe, plus earlier resumed segments)."""
        return self.wall_before_s + (time.perf_counter() - self.t0 if self.t0 is not None else 0.0)

    def _log(self, trainer, step: int, stats: mem.MemStats, row: dict) -> None:
        logged = {
            metric("mem/signal"): row["signal"],
            metric("mem/loss_gap"): row["loss_gap"],
            metric("mem/var_gap"): row["var_gap"],
            metric("mem/alarm"): float(row["alarm"]),
        }
        for k in self.euler_steps:
            logged[metric("mem/pair_acc", k)] = stats.pair_acc[k]
            logged[metric("mem/holdout_pair_acc", k)] = stats.holdout_pair_acc[k]
        for b in range(self.edges.numel() - 1):
            for stat in ("loss_train", "loss_holdout", "loss_ratio", "var_train", "var_holdout", "var_ratio"):
                logged[mem_key(b, stat)] = float(row[f"bin{b:02d}_{stat}"])
        for lg in trainer.loggers:
            lg.log_metrics(logged, step=step)

    @staticmethod
    def _append(path: Path, row: dict) -> None:
        """Append ``row`` (header first when the file is new), flushed to disk before returning. A file with other
        columns is refused; a last row cut short by a crash is left as it is and this one starts a new line."""
        new = not path.exists() or path.stat().st_size == 0
        cut = False
        if not new:
            with path.open(newline="") as fh:
                header = next(csv.reader(fh), [])
            if header != list(row):
                raise ValueError(
                    f"{path} has other columns than this run's {_KEY} settings write (bins, euler_steps): "
                    "move it away or resume with the settings that wrote it"
                )
            with path.open("rb") as fh:
                fh.seek(-1, os.SEEK_END)
                cut = fh.read(1) != b"\n"
        with path.open("a", newline="") as fh:
            if cut:
                fh.write("\r\n")
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
            fh.flush()
            os.fsync(fh.fileno())

    # --- results --------------------------------------------------------------------------------
    def final_metrics(self) -> dict[str, float]:
        """The metrics.json keys: ``mem/probes``, ``mem/time_share``, the last probe's ``mem/signal``,
        ``mem/loss_gap``, ``mem/var_gap`` and, when the alarm was raised, ``mem/alarm_step``."""
        if not self.probes:
            return {}
        out = {metric("mem/probes"): float(self.probes), metric("mem/time_share"): self.callback_s / self.wall_s()}
        for name, col in (("mem/signal", "signal"), ("mem/loss_gap", "loss_gap"), ("mem/var_gap", "var_gap")):
            out[metric(name)] = float(self.last_row[col])
        if self.alarm.step is not None:
            out[metric("mem/alarm_step")] = float(self.alarm.step)
        return out

    def state_dict(self) -> dict:
        return {
            "alarm": self.alarm.state_dict(),
            "callback_s": self.callback_s,
            "wall_s": self.wall_s(),
            "probes": self.probes,
            "last_step": self.last_step,
            "last_row": self.last_row,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.alarm.load_state_dict(state_dict.get("alarm", {}))
        self.callback_s = float(state_dict.get("callback_s", 0.0))
        self.wall_before_s = float(state_dict.get("wall_s", 0.0))
        self.probes = int(state_dict.get("probes", 0))
        self.last_step, self.last_row = int(state_dict.get("last_step", -1)), state_dict.get("last_row")

    # --- hooks ----------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)
        if not trainer.is_global_zero or not self.probes:
            return
        if self.alarm.step is None:
            say(f"flowmatch: memorization: no alarm in {self.probes} probes (last: {self.evidence(self.last_row)})")
        path = Path(trainer.default_root_dir) / self.filename
        if self.plot and path.exists():
            from flowmatch.plots.memorization_run import plot_run

            if plot_run(path, path.with_suffix(".png"), caption=sigma_caption(pl_module)) is not None:
                log_image(trainer, media_key("mem/figure"), path.with_suffix(".png"))
