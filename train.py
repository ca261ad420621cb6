"""Train a flow-matching model: ``python train.py [group=option ...] [key=value ...]``.

Writes into the Hydra run dir: .hydra/config.yaml, checkpoints/last.ckpt, metrics.json
(final train/... and eval/... scalars), logger output (csv/, wandb/), and the callbacks' files.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from flowmatch.entry import (
    build,
    fail,
    instantiate_all,
    preflight,
    run_evaluation,
    set_threads,
    stop_nonfinite,
    user_errors,
    write_json,
)
from flowmatch.finite import NonFiniteLoss
from flowmatch.keys import metric

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


def _resolve_ckpt(ckpt_path, ckpt_dir: Path):
    if ckpt_path in (None, "last"):
        last = ckpt_dir / "last.ckpt"
        return str(last) if ckpt_path == "last" and last.exists() else ckpt_path
    if not Path(ckpt_path).exists():
        fail(f"ckpt_path={ckpt_path!r} does not exist (give a checkpoint file, or `last`)")
    return ckpt_path


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    """Train, evaluate at the end (``eval`` group) and write the run directory; returns metrics.json's content."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    set_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with user_errors(run_dir):
        datamodule, module, solver = build(cfg)
        eval_options = instantiate(cfg.eval)
        module.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        callbacks = instantiate_all(cfg.callbacks, "callbacks")
        for cb in callbacks:  # a callback may check its settings against the data before training
            if hasattr(cb, "validate"):
                cb.validate(datamodule=datamodule, module=module)
        loggers = instantiate_all(cfg.logger, "logger")
        ckpt_dir = run_dir / "checkpoints"
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint.every_n_train_steps
            )
        )
        trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir))
        ckpt_path = _resolve_ckpt(cfg.ckpt_path, ckpt_dir)
    n_params = sum(p.numel() for p in module.model.parameters())
    print(f"flowmatch: {type(module.model).__name__} with {n_params:,} parameters; run dir {run_dir}")

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except NonFiniteLoss as exc:  # no evaluation, no checkpoint of the non-finite weights
        stop_nonfinite(exc, ckpt_dir / "last.ckpt")
    if not trainer.is_global_zero:
        return {}
    metrics = {metric("train/global_step"): float(trainer.global_step)}
    for key in (metric("train/loss"), metric("val/loss")):
        if key in trainer.callback_metrics:
            metrics[key] = float(trainer.callback_metrics[key])
    for cb in callbacks:  # e.g. the memorization callback: mem/alarm_step, mem/time_share
        if hasattr(cb, "final_metrics"):
            metrics.update(cb.final_metrics())
    if eval_options.enabled:
        metrics.update(
            run_evaluation(module, datamodule, solver, eval_options, module.device, run_dir, ckpt_dir / "last.ckpt")
        )
        for lg in loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if k.startswith("eval/")}, step=trainer.global_step)
    write_json(run_dir / "metrics.json", metrics)
    for lg in loggers:
        lg.finalize("success")
        if type(lg).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
    print(f"flowmatch: wrote {run_dir / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    preflight("train")
    main()
