"""Train a flow-matching model: ``python train.py [group=option ...] [key=value ...]``.

Writes into the Hydra run dir: .hydra/config.yaml, checkpoints/last.ckpt, metrics.json
(final train/... and eval/... scalars), logger output (csv/; wandb/ and wandb_id.txt), and the callbacks' files.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from flowmatch import sweeps, wandb_run
from flowmatch.entry import (
    batch_protocol,
    build,
    describe_batch,
    fail,
    instantiate_all,
    is_sharded,
    preflight,
    run_evaluation,
    set_threads,
    sharded_error,
    stop_nonfinite,
    user_errors,
    write_json,
)
from flowmatch.finite import NonFiniteLoss
from flowmatch.keys import metric
from flowmatch.resume import ExactResume
from flowmatch.terminal import quiet, say


def _resolve_ckpt(ckpt_path, ckpt_dir: Path):
    """The checkpoint to resume from: a file; ``last`` (this run dir's ``checkpoints/last.ckpt``, which must exist);
    ``auto`` (that file when it exists, else a fresh start: requeued or re-run sweep jobs); None (fresh)."""
    last = ckpt_dir / "last.ckpt"
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        return str(last) if last.exists() else None
    if ckpt_path == "last":
        if not last.exists():
            fail(
                f"ckpt_path=last: there is no {last} to resume. Resume a run in its own directory: "
                f"`python train.py hydra.run.dir=RUN_DIR ckpt_path=last` (the overrides of the first run too), "
                "or give a checkpoint file, or ckpt_path=auto (resume when there is one, else start fresh)"
            )
        return str(last)
    if not Path(ckpt_path).exists():
        fail(f"ckpt_path={ckpt_path!r} does not exist (give a checkpoint file, `last` or `auto`)")
    return ckpt_path


def _batch(trainer, datamodule) -> tuple[int, int, int, int]:
    """(per-device batch, devices, nodes, accumulate_grad_batches): the factors of the global batch."""
    return datamodule.batch_size, trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches


def _loggers(group: DictConfig, run_dir: Path, resuming: bool) -> list:
    """The ``logger`` group instantiated; a WandbLogger gets its id, resume mode and sweep group first
    (``flowmatch/wandb_run.py``)."""
    hydra_cfg = HydraConfig.get()
    sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
    rank_zero = rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    with open_dict(group):
        for node in group.values():
            if isinstance(node, DictConfig) and node.get("_target_") == wandb_run.WANDB_LOGGER:
                node.update(wandb_run.init_settings(node, run_dir, sweep_dir, resuming, rank_zero))
    return instantiate_all(group, "logger")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict | None:
    """One job: :func:`train`; in a sweep, a failed job is recorded and the others go on (``flowmatch.sweeps``)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    quiet(cfg.verbose)
    with sweeps.job_guard(run_dir):
        return train(cfg, run_dir)
    return None  # a failed sweep job (reported at the end of the sweep)


def _progress(cfg: DictConfig):
    """The ``progress`` callback with ``auto`` resolved: a live bar for a single run on an interactive terminal
    (unless ``trainer.enable_progress_bar=false``), progress lines otherwise."""
    progress = instantiate(cfg.progress)
    single = HydraConfig.get().mode != RunMode.MULTIRUN
    progress.resolve(interactive=single and sys.stderr.isatty() and cfg.trainer.get("enable_progress_bar", True))
    return progress


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train, evaluate at the end (``eval`` group) and write the run directory; returns metrics.json's content."""
    set_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with user_errors(run_dir):
        datamodule, module, solver = build(cfg)
        eval_options = instantiate(cfg.eval)
        module.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        callbacks = instantiate_all(cfg.callbacks, "callbacks")
        if sharded := sharded_error(cfg):  # also checked before the run (flowmatch.entry.run_errors)
            fail(sharded)
        if is_sharded(cfg) and eval_options.enabled:
            eval_options = dataclasses.replace(eval_options, enabled=False)
            say(
                "flowmatch: trainer.strategy=fsdp: no end-of-training evaluation (it needs the whole model on one "
                "rank); evaluate checkpoints/last.ckpt with evaluate.py"
            )
        for cb in callbacks:  # a callback may check its settings against the data before training
            if hasattr(cb, "validate"):
                cb.validate(datamodule=datamodule, module=module)
        progress = _progress(cfg)
        callbacks.append(progress)
        ckpt_dir = run_dir / "checkpoints"
        # first, so each batch's random state is set before any other callback's batch hooks (flowmatch/resume.py)
        callbacks.insert(0, ExactResume())
        ckpt_path = _resolve_ckpt(cfg.ckpt_path, ckpt_dir)
        loggers = _loggers(cfg.logger, run_dir, resuming=ckpt_path is not None and Path(ckpt_path).exists())
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint.every_n_train_steps
            )
        )
        trainer = instantiate(
            cfg.trainer,
            logger=loggers or False,
            callbacks=callbacks,
            default_root_dir=str(run_dir),
            enable_progress_bar=progress.bar,
        )
    if rank_zero_only.rank == 0:
        n_params = sum(p.numel() for p in module.model.parameters())
        say(f"flowmatch: {type(module.model).__name__} with {n_params:,} parameters; run dir {run_dir}")
        say(describe_batch(*_batch(trainer, datamodule), lr=cfg.optimizer.get("lr")))

    ok = False
    try:
        metrics = _fit_and_evaluate(trainer, module, datamodule, solver, eval_options, ckpt_path, run_dir)
        ok = True
    finally:  # on an error too: the wandb run ends (as failed), so the next job of a sweep starts its own
        wandb_run.close(loggers, ok)
    if metrics:
        say(f"flowmatch: wrote {run_dir / 'metrics.json'}")
    return metrics


def _fit_and_evaluate(trainer, module, datamodule, solver, eval_options, ckpt_path, run_dir: Path) -> dict:
    """Train, then (global rank zero only) evaluate, send the eval/ metrics to the loggers (wandb: every
    metrics.json value into the run's summary) and write metrics.json; returns its content ({} on other ranks)."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except NonFiniteLoss as exc:  # no evaluation, no checkpoint of the non-finite weights
        stop_nonfinite(exc, run_dir / "checkpoints" / "last.ckpt")
    if not trainer.is_global_zero:
        return {}
    metrics = {metric("train/global_step"): float(trainer.global_step), **batch_protocol(*_batch(trainer, datamodule))}
    for key in (metric("train/loss"), metric("val/loss")):
        if key in trainer.callback_metrics:
            metrics[key] = float(trainer.callback_metrics[key])
    for cb in trainer.callbacks:  # e.g. the memorization callback: mem/alarm_step, mem/time_share
        if hasattr(cb, "final_metrics"):
            metrics.update(cb.final_metrics())
    if eval_options.enabled:
        last = run_dir / "checkpoints" / "last.ckpt"
        metrics.update(run_evaluation(module, datamodule, solver, eval_options, module.device, run_dir, last))
        for lg in trainer.loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if k.startswith("eval/")}, step=trainer.global_step)
    wandb_run.set_summary(trainer.loggers, metrics)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    preflight("train")
    main()
    sys.exit(sweeps.exit_status())
