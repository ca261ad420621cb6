"""The wandb run of one train.py job (``logger=wandb``): its id, group and name, its summary, and its end.

One job is one wandb run. Its id is kept in ``<run dir>/wandb_id.txt`` (:data:`ID_FILE`): a job that resumes
from a checkpoint in a run dir holding that file (``ckpt_path=last``) continues the same wandb run
(``resume="allow"``); a fresh start writes a new id. The group is ``logger.wandb.group`` when set, else, in a
multirun, the sweep (:func:`sweep_group`); the name is ``hydra.job.override_dirname`` (``conf/logger/wandb.yaml``).
:func:`close` ends every logger, ``wandb.finish`` included, whether the job succeeded or failed.

Entry layer: only train.py imports this module, and wandb is imported only when a wandb logger is in use.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path

ID_FILE = "wandb_id.txt"
WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"

__all__ = ["ID_FILE", "WANDB_LOGGER", "sweep_group", "run_id", "init_settings", "set_summary", "close"]


def sweep_group(sweep_dir: str | Path) -> str:
    """The wandb group of the jobs of one sweep: the last two parts of ``hydra.sweep.dir``
    (``multirun/train/2026-01-02_03-04-05-123456`` -> ``train/2026-01-02_03-04-05-123456``,
    ``outputs/paper/fig-gradvar`` -> ``paper/fig-gradvar``)."""
    return "/".join(Path(sweep_dir).parts[-2:])


def run_id(run_dir: str | Path, resuming: bool, rank_zero: bool) -> str | None:
    """The wandb id of this job: the one in ``run_dir/wandb_id.txt`` when resuming and the file exists, else a new
    one, written there. Only global rank zero (the rank that logs) reads or writes; other ranks get None."""
    if not rank_zero:
        return None
    path = Path(run_dir) / ID_FILE
    if resuming and path.exists() and path.read_text().strip():
        return path.read_text().strip()
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's id format
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new + "\n")
    return new


def init_settings(node, run_dir: str | Path, sweep_dir: str | Path | None, resuming: bool, rank_zero: bool) -> dict:
    """Keyword arguments completing a WandbLogger config ``node`` (a mapping): ``id`` and ``resume="allow"`` (see
    :func:`run_id`), and ``group`` = :func:`sweep_group` of ``sweep_dir`` (None outside a multirun) unless the
    node sets one."""
    settings = {"id": run_id(run_dir, resuming, rank_zero), "resume": "allow"}
    if not node.get("group") and sweep_dir is not None:
        settings["group"] = sweep_group(sweep_dir)
    return settings


def _wandb_loggers(loggers) -> list:
    return [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]


def set_summary(loggers, metrics: dict) -> None:
    """Put ``metrics`` (metrics.json's content: numbers and ``protocol/`` strings) into each wandb run's summary."""
    for lg in _wandb_loggers(loggers):
        lg.experiment.summary.update(metrics)


def close(loggers, ok: bool) -> None:
    """Finalize every logger (``success`` or ``failed``) and finish the wandb run with exit code 0 or 1, so the next
    job of a sweep in the same process starts its own run and a failed job shows as failed."""
    for lg in loggers:
        lg.finalize("success" if ok else "failed")
    if _wandb_loggers(loggers):
        import wandb

        wandb.finish(exit_code=0 if ok else 1)
