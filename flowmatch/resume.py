"""Exact resume: a run killed after a checkpoint and resumed from it ends as the uninterrupted run would.

What a resumed run needs beyond Lightning's own checkpoint (weights, optimizer, scheduler, loop counters and the
callbacks' ``state_dict``), all kept by :class:`ExactResume` in the checkpoint:

- where this rank's training-pair stream stands: the index of the next batch and the stream's generator state
  before it (:class:`flowmatch.data.base.PairStream`); ranks other than 0, whose states rank 0 does not hold,
  replay their stream up to that batch instead (exact, one draw per skipped batch);
- the global random state that draws t and eps in ``training_step`` (and dropout): CPU and, on CUDA, the
  device generators. In every run, each training batch starts from the random state the previous batch ended
  with: whatever runs between two batches (validation, whose data loader draws a seed from the global
  generator; figures; evaluations) leaves the training draws alone. A checkpoint stores that state, and the
  first resumed batch starts from it.

On resume the run directory's CSV files are cut back to the checkpoint's step (rows logged after it came from
the lost part of the run and are logged again), and the CSV logger appends instead of deleting its file
(:class:`ResumableCSVLogger`). At every save the CSV logger is flushed, so the rows up to the checkpoint are on
disk when a kill comes.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

# Files of the run directory with a ``step`` column, cut back to the checkpoint's step on resume.
STEP_CSVS = ("gradvar.csv", "gradvar_groups.csv", "gradvar_integrated.csv", "memorization.csv", "csv/metrics.csv")


def rng_state() -> dict:
    """The global random state: CPU, and each CUDA device's when CUDA is initialised."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where this process has the same devices)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def truncate_after_step(path: Path, step: int) -> int:
    """Drop the rows of CSV ``path`` whose ``step`` is > ``step`` (and a torn last line); returns rows dropped.
    Written to a temporary file and renamed, so a kill during the cut leaves the old or the new file whole."""
    if not path.exists():
        return 0
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):  # a torn last line from a killed writer
        lines = lines[:-1]
    reader = csv.DictReader(io.StringIO("".join(lines)))
    if reader.fieldnames is None or "step" not in reader.fieldnames:
        return 0
    kept, dropped = [], 0
    for row in reader:
        value = row.get("step") or ""
        try:
            late = float(value) > step
        except ValueError:
            late = False
        if late:
            dropped += 1
        else:
            kept.append(row)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=reader.fieldnames)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)
    return dropped


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer without the deletion of an existing ``metrics.csv``: it appends to it, starting from
    the file's header (a key logged before the resume is not new)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as fh:
                self.metrics_keys = sorted(next(csv.reader(fh), []))

    def _check_log_dir_exists(self) -> None:
        pass


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume in the same run directory (Lightning's deletes it)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class ExactResume(L.Callback):
    """Saves and restores what an exact resume needs (module docstring); always on in ``train.py``."""

    def __init__(self) -> None:
        self.pending: dict | None = None  # restored state, applied at the first resumed batch
        self.between: dict | None = None  # the random state at the end of the last training batch

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer = trainer

    # --- save -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        batch = trainer.global_step * trainer.accumulate_grad_batches
        stream = getattr(trainer.datamodule, "train_stream", None)
        for lg in trainer.loggers:  # rows up to this checkpoint are on disk before a kill can come
            if isinstance(lg, CSVLogger):
                lg.save()
        return {
            "step": trainer.global_step,
            "stream": stream.state_at(batch) if stream is not None else {"batch": batch},
            "rng": self.between if self.between is not None else rng_state(),
        }

    # --- restore ----------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        self.pending = state_dict
        dm = self.trainer.datamodule
        stream = dict(state_dict["stream"])
        if self.trainer.global_rank != 0:
            stream.pop("state", None)  # rank 0's generator state: other ranks replay their own stream
        dm.train_resume = stream
        if self.trainer.is_global_zero:
            run_dir = Path(self.trainer.default_root_dir)
            for name in STEP_CSVS:
                truncate_after_step(run_dir / name, int(state_dict["step"]))

    # --- each batch starts where the last one ended ----------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.between = rng_state()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.pending is not None:
            self.between, self.pending = self.pending["rng"], None
        if self.between is not None:
            set_rng_state(self.between)
