"""Train a flow-matching model: ``python train.py [group=option ...] [key=value ...]``.

Writes into the Hydra run dir: .hydra/config.yaml, checkpoints/last.ckpt, metrics.json
(final train/... and eval/... scalars), logger output (csv/, wandb/), and the callbacks' files.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from flowmatch.entry import build, eval_options, fail, preflight, set_threads, user_errors, write_json
from flowmatch.evaluation import evaluate_flow

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


def _resolve_ckpt(ckpt_path, ckpt_dir: Path):
    if ckpt_path in (None, "last"):
        last = ckpt_dir / "last.ckpt"
        return str(last) if ckpt_path == "last" and last.exists() else ckpt_path
    if not Path(ckpt_path).exists():
        fail(f"ckpt_path={ckpt_path!r} does not exist (give a checkpoint file, or `last`)")
    return ckpt_path


def _final_eval(cfg: DictConfig, module, datamodule, solver, run_dir: Path, eval_kwargs: dict) -> dict:
    module.eval()
    setup = datamodule.eval_setup()
    result = evaluate_flow(module.velocity, setup, solver,
                           euler_steps=cfg.eval.euler_steps, n_fresh=cfg.eval.n_fresh, seed=cfg.eval.seed,
                           keep_trajectories=cfg.eval.keep_trajectories, device=module.device, **eval_kwargs)
    if result.trajectories:
        x0, x1 = datamodule.coupling.pairs
        torch.save({"x0": x0, "x1": x1, **result.trajectories}, run_dir / "eval_trajectories.pt")
    if setup.train_data is None:  # vector data: metrics.json keeps only float scalars
        return result.metrics
    return {**result.metrics, **result.protocol, "protocol/ema": str(module.sampling_model is not None).lower()}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    set_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with user_errors():
        datamodule, module, solver = build(cfg)
        eval_kwargs = eval_options(cfg.eval)
        module.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        callbacks = [instantiate(c) for c in cfg.callbacks.values()]
        for cb in callbacks:  # a callback may check its settings against the data before training
            if hasattr(cb, "validate"):
                cb.validate(datamodule=datamodule, module=module)
        loggers = [instantiate(c) for c in cfg.logger.values()]
        ckpt_dir = run_dir / "checkpoints"
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                         every_n_train_steps=cfg.checkpoint.every_n_train_steps))
        trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir))
        ckpt_path = _resolve_ckpt(cfg.ckpt_path, ckpt_dir)
    n_params = sum(p.numel() for p in module.model.parameters())
    print(f"flowmatch: {type(module.model).__name__} with {n_params:,} parameters; run dir {run_dir}")

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if not trainer.is_global_zero:
        return {}
    metrics = {"train/global_step": float(trainer.global_step)}
    for key in ("train/loss", "val/loss"):
        if key in trainer.callback_metrics:
            metrics[key] = float(trainer.callback_metrics[key])
    if cfg.eval.enabled:
        metrics.update(_final_eval(cfg, module, datamodule, solver, run_dir, eval_kwargs))
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
