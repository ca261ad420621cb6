"""Entry-layer helpers shared by ``train.py`` and ``evaluate.py``: stopping with one line, building the components
from a composed config, the end-of-training evaluation, the batch semantics. Checking a command line before any work
is ``flowmatch/preflight.py``; sweeps are ``flowmatch/sweeps.py``. The math core and the Lightning layer never
import the entry layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flowmatch import terminal


def fail(message: str, status: int = 2) -> None:
    """Show one clear error line (terminal and the run's log file) and stop (exit status 2: bad input; 1: a fault
    at run time). The ``SystemExit`` carries the line as ``.message`` (a sweep's report repeats it)."""
    terminal.error(message)
    stop = SystemExit(status)
    stop.message = message
    raise stop


HYDRA_FILES = (".hydra",)


def discard_run_dir(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but what Hydra wrote at the start (``.hydra/``, ``*.log``): after
    a config error, no empty run directory is left behind."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or any(p.name not in HYDRA_FILES and p.suffix != ".log" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.contextmanager
def user_errors(run_dir: Path | None = None):
    """Turn a configuration error raised while building components into one clear line; ``run_dir``: removed
    when it holds nothing but Hydra's own files (:func:`discard_run_dir`)."""
    try:
        yield
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if run_dir is not None:
            discard_run_dir(run_dir)
        fail(
            str(cause) if isinstance(cause, (ValueError, FileNotFoundError, TypeError)) else " ".join(str(exc).split())
        )
    except (ValueError, FileNotFoundError) as exc:
        if run_dir is not None:
            discard_run_dir(run_dir)
        fail(str(exc))
    except SystemExit:
        if run_dir is not None:
            discard_run_dir(run_dir)
        raise


_PARENT_PID = os.getppid()  # a DDP rank that Lightning's launcher started: the launching process (rank 0 of the node)


def stop_nonfinite(exc: Exception, last_ckpt: Path, trainer=None) -> None:
    """Stop after a non-finite training loss (``flowmatch.finite.NonFiniteLoss``) with one line naming the step,
    the last finite loss and the checkpoint kept (exit status 1). Under DDP every rank stops here with the same line;
    ``trainer``: a rank that Lightning's launcher started waits for its launching process to exit first
    (:func:`_outlive_launcher`)."""
    kept = "no checkpoint was written"
    if Path(last_ckpt).exists():
        try:
            step = torch.load(last_ckpt, map_location="cpu", weights_only=False, mmap=True).get("global_step", "?")
        except Exception:
            step = "?"
        kept = f"{last_ckpt} (step {step}) is kept"
    try:
        fail(f"{exc}; stopped without evaluating; {kept}. Lower optimizer.lr or check the data", status=1)
    finally:
        _outlive_launcher(trainer)


def _outlive_launcher(trainer, timeout_s: float = 30.0) -> None:
    """On a rank > 0 that Lightning's launcher started (``LightningEnvironment``: a child process of the node's
    rank 0), wait until that process has exited (at most ``timeout_s``). Lightning's launcher kills itself and every
    rank as soon as one of its children exits with a non-zero status, which would turn rank 0's clean exit status 1
    into a SIGKILL; exiting after it keeps its status. Other launchers (SLURM, torchrun) start every rank
    themselves: no wait."""
    if trainer is None or trainer.local_rank == 0:
        return
    from lightning.fabric.plugins.environments import LightningEnvironment

    if type(getattr(trainer.strategy, "cluster_environment", None)) is not LightningEnvironment:
        return
    sys.stderr.flush()
    deadline = time.monotonic() + timeout_s
    while os.getppid() == _PARENT_PID and time.monotonic() < deadline:
        time.sleep(0.05)


def set_threads(threads) -> None:
    """``torch.set_num_threads(threads)`` unless ``threads`` is None (config key ``threads``)."""
    if threads is not None:
        torch.set_num_threads(int(threads))


def build(cfg: DictConfig, datamodule_state: dict | None = None):
    """Instantiate (datamodule, module, solver) from a composed config. ``datamodule_state`` (a checkpoint's):
    restored before ``setup()``, so a finite coupling takes its saved pairs instead of drawing (or solving an
    OT problem for) new ones."""
    from flowmatch.module import FlowMatchingModule

    coupling = instantiate(cfg.coupling)
    datamodule = instantiate(cfg.data, coupling=coupling)
    if datamodule_state:
        datamodule.load_state_dict(datamodule_state)
    interpolant = instantiate(cfg.interpolant)
    solver = instantiate(cfg.solver)
    model = instantiate(cfg.model)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = FlowMatchingModule(model, interpolant, instantiate(cfg.optimizer), scheduler, **cfg.get("module", {}))
    datamodule.setup()
    return datamodule, module, solver


def instantiate_all(group: DictConfig, name: str) -> list:
    """Instantiate every entry of a dict-of-objects group (``callbacks``, ``logger``); an entry without ``_target_``
    (an overlay set options of a callback that the chosen list does not include) stops with one clear error."""
    chosen = [k for k, v in group.items() if isinstance(v, DictConfig) and "_target_" in v]
    for key, node in group.items():
        if key not in chosen:
            settings = ", ".join(map(str, node)) if isinstance(node, DictConfig) else repr(node)
            fail(
                f"{name}.{key} has settings ({settings}) but no _target_: it is not among the chosen {name} "
                f"({', '.join(chosen) or 'none'}). Add it to the list ({name}=[...,{key}]) or drop its settings "
                f"(~{name}.{key})"
            )
    return [instantiate(node) for node in group.values()]


def run_evaluation(module, datamodule, solver, options, device, run_dir: Path, ckpt_path: str) -> dict:
    """The one evaluation of train.py (end of training) and evaluate.py: ``evaluate_module`` (``evaluate_flow``
    on the sampling weights), ``eval/...`` and ``protocol/...`` keys (plus which checkpoint and whether EMA
    weights were used); saves the kept trajectories of the training sources in ``eval_trajectories.pt``."""
    from flowmatch.evaluation import evaluate_module
    from flowmatch.sampling import IntegrationError

    try:
        result = evaluate_module(
            module, datamodule.eval_setup(), solver, options, device, ckpt_path=str(ckpt_path), say=terminal.say
        )
    except IntegrationError as exc:
        fail(f"the evaluation stopped: {exc}; {ckpt_path} is kept", status=1)
    if result.trajectories:
        x0, x1 = datamodule.coupling.pairs
        torch.save({"x0": x0, "x1": x1, **result.trajectories}, Path(run_dir) / "eval_trajectories.pt")
    return {**result.metrics, **result.protocol}


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as one flat JSON object (atomic: a partial file never replaces a good one)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


LR_RULE = "none: lr is used as given"
"""The learning-rate rule across global batch sizes: no scaling with the batch (``train/lr_scale`` = 1)."""


def batch_protocol(per_device: int, devices: int, nodes: int, accumulate: int) -> dict:
    """The batch semantics of a run: ``data.batch_size`` is per device (process), so the effective global batch of
    one optimizer step is per_device x devices x nodes x accumulate_grad_batches; metrics.json keys
    ``train/global_batch_size``, ``train/world_size`` and ``train/lr_scale`` (1.0: :data:`LR_RULE`)."""
    from flowmatch.keys import metric

    world = int(devices) * int(nodes)
    return {
        metric("train/global_batch_size"): float(int(per_device) * world * int(accumulate)),
        metric("train/world_size"): float(world),
        metric("train/lr_scale"): 1.0,
    }


def describe_batch(per_device: int, devices: int, nodes: int, accumulate: int, lr) -> str:
    """The start-of-training line that states the batch semantics and the learning-rate rule."""
    glob = int(per_device) * int(devices) * int(nodes) * int(accumulate)
    return (
        f"flowmatch: global batch {glob} = data.batch_size {per_device} per device x {devices} device(s) x "
        f"{nodes} node(s) x accumulate_grad_batches {accumulate}; learning rate {lr} ({LR_RULE})"
    )


SHARDED_OK = ("Throughput",)
"""Callbacks (class names) that run under a sharded strategy (fsdp); the others need the whole model on one rank."""


def is_sharded(cfg: DictConfig) -> bool:
    """Whether ``trainer.strategy`` shards the parameters across ranks (fsdp)."""
    return "fsdp" in str(OmegaConf.select(cfg, "trainer.strategy", default="auto")).lower()


def sharded_error(cfg: DictConfig) -> str | None:
    """The error line when the strategy shards the parameters (fsdp) and a chosen callback needs the whole model on
    one rank (the EMA copy, per-sample gradients, sampling on rank 0); None when the run is fine. From the config
    alone, so it is reported before any work. (The end-of-training evaluation is skipped under fsdp: train.py.)"""
    if not is_sharded(cfg):
        return None
    chosen = {k: v for k, v in (cfg.get("callbacks") or {}).items() if isinstance(v, DictConfig) and "_target_" in v}
    bad = [
        f"callbacks.{name}" for name, node in chosen.items() if str(node._target_).rsplit(".", 1)[-1] not in SHARDED_OK
    ]
    if not bad:
        return None
    return (
        f"trainer.strategy={cfg.trainer.strategy} shards the parameters across ranks, but {', '.join(bad)} need(s) "
        "the whole model on one rank; with fsdp use callbacks=throughput (or none), or use trainer=ddp"
    )
