"""Entry-layer helpers shared by ``train.py`` and ``evaluate.py`` (the only modules that import this).

This is the one place in the package that imports Hydra: composing, checking and instantiating
configs. The math core and the Lightning layer never import it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flowmatch import sweeps, terminal
from flowmatch.checkpoints import CheckpointError, architecture_error, read_checkpoint
from flowmatch.preconditions import output_dir_error, wandb_error
from flowmatch.validate import config_errors

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def fail(message: str, status: int = 2) -> None:
    """Show one clear error line (terminal and the run's log file) and stop (exit status 2: bad input; 1: a fault
    at run time). The ``SystemExit`` carries the line as ``.message`` (a sweep's report repeats it)."""
    terminal.error(message)
    stop = SystemExit(status)
    stop.message = message
    raise stop


def _first_values(args: list[str]) -> list[str] | None:
    """The command-line overrides (Hydra's own included: the launcher) with every sweep reduced to its first value
    (None: can't)."""
    parser = OverridesParser.create()
    out = []
    for ov in parser.parse_overrides([a for a in args if not a.startswith("-")]):
        if ov.is_sweep_override():
            try:
                first = next(iter(ov.sweep_string_iterator()))
            except Exception:  # glob() sweeps need Hydra's config loader
                return None
            prefix = {"ADD": "+", "FORCE_ADD": "++"}.get(ov.type.name, "")
            out.append(f"{prefix}{ov.key_or_group}={first}")
        else:
            out.append(ov.input_line)
    return out


def _explain_unknown_key(config_name: str, overrides: list[str], bad: str) -> str:
    """Name the misspelt key and list the keys that exist where it was looked for."""
    others = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~") == bad]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            cfg = compose(config_name, overrides=others, return_hydra_config=True)
        except Exception:
            return f"unknown config key '{bad}'"
    parent, _, _ = bad.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    while not isinstance(node, DictConfig) and parent:
        parent, _, _ = parent.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = ", ".join(sorted(str(k) for k in node.keys())) if isinstance(node, DictConfig) else "?"
    where = f"under '{parent}'" if parent else "at the top level"
    return f"unknown config key '{bad}'; the keys {where} are: {keys} (use +{bad}=... to add a new key)"


def preflight(config_name: str, argv: list[str] | None = None) -> None:
    """Check the command line before Hydra runs (so before the run directory exists) and stop with one line at its
    first problem (:func:`first_error`)."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help") or a.startswith("--cfg") for a in args):
        return
    message = sweep_error(config_name, args) if sweeps.is_multirun(args) else first_error(config_name, args)
    if message:
        fail(message)


def sweep_error(config_name: str, args: list[str]) -> str | None:
    """The problems of a multirun command line, each job checked on its own (:func:`first_error`) before any
    starts: one message naming every invalid job (``flowmatch.sweeps``). Tells the jobs their count."""
    expanded = sweeps.expand_jobs(args)
    if expanded is None:  # a sweep only Hydra's config loader can expand: its first values are checked
        return first_error(config_name, args)
    jobs, keys = expanded
    flags = [a for a in args if a.startswith("-")]
    errors = [first_error(config_name, flags + job) for job in jobs]
    sweeps.announce(len(jobs), keys)
    return sweeps.bad_jobs_message(errors, jobs, keys)


def first_error(config_name: str, args: list[str]) -> str | None:
    """The first problem of a command line (every sweep at its first value; a sweep launcher can pass each job's
    overrides), or None: unknown options and keys (naming what exists), then ``flowmatch.validate.config_errors``,
    then :func:`run_errors` (docs/DESIGN.md, "Errors")."""
    try:
        overrides = _first_values(args)
    except Exception as exc:  # a syntax error
        return str(exc).strip().splitlines()[0]
    if overrides is None:
        return None
    dirs = [a for a in args if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=overrides + dirs, return_hydra_config=True)
            reference = _reference(config_name, tuple(o for o in overrides if _is_group(o)))
    except MissingConfigException as exc:
        return " ".join(str(exc).split("Config search path")[0].split())
    except ConfigCompositionException as exc:
        text = str(exc) + " " + str(exc.__cause__ or "")
        if "not in struct" in text or "Key '" in text:
            bad = text.split("Could not override '", 1)[-1].split("'", 1)[0] if "Could not override '" in text else ""
            if bad:
                return _explain_unknown_key(config_name, overrides, bad)
        return " ".join(str(exc).split())
    value_keys = [o.split("=", 1)[0].lstrip("+") for o in overrides if "=" in o and not _is_group(o)]
    multirun = any(a in ("-m", "--multirun") for a in args)
    errors = config_errors(cfg, reference, value_keys) or run_errors(config_name, cfg, multirun)
    return errors[0] if errors else None


def _is_group(override: str) -> bool:
    """Whether an override chooses a config group option (``interpolant=cfm``) rather than sets a value."""
    key = override.split("=", 1)[0].lstrip("+~")
    return (Path(CONF_DIR) / key.replace(".", "/")).is_dir() or key.startswith("~") or override.startswith("~")


@functools.lru_cache(maxsize=64)
def _reference(config_name: str, group_overrides: tuple[str, ...]):
    """The config with the command line's group choices only: the types its value overrides must keep (cached:
    the jobs of a sweep share it)."""
    try:
        return compose(config_name, overrides=list(group_overrides))
    except Exception:
        return None


EVAL_TASKS_WITH_CKPT = ("metrics", "reflow_pairs", "stability")


def run_errors(config_name: str, cfg: DictConfig, multirun: bool = False) -> list[str]:
    """What the machine and the named files must provide (checked after the config itself, before any work):
    a writable output directory, a GPU for a GPU trainer, wandb credentials or an offline mode, and a usable
    ``ckpt_path``."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    raw = OmegaConf.to_container(cfg.hydra.sweep if multirun else cfg.hydra.run, resolve=False)["dir"]
    errors = [e for e in [output_dir_error(str(raw), key)] if e]
    logger = cfg.get("logger") or {}
    if config_name == "train" and isinstance(logger.get("wandb"), DictConfig) and "_target_" in logger.wandb:
        errors += [e for e in [wandb_error({"offline": logger.wandb.get("offline")})] if e]
    if config_name == "train":
        errors += [e for e in [sharded_error(cfg)] if e]
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    if config_name == "train" and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        errors.append(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU (use trainer=cpu or ddp_cpu)"
        )
    ckpt_path = cfg.get("ckpt_path")
    if config_name == "evaluate" and cfg.get("task") in EVAL_TASKS_WITH_CKPT and ckpt_path is None:
        errors.append(
            f"ckpt_path is required for task={cfg.task} (a checkpoint written by train.py: RUN/checkpoints/last.ckpt)"
        )
    if ckpt_path is not None and not (config_name == "train" and ckpt_path in ("last", "auto")):
        if config_name == "train" or cfg.get("task") in EVAL_TASKS_WITH_CKPT:
            errors += _checkpoint_errors(ckpt_path, cfg.model if config_name == "train" else None)
    return errors


def _checkpoint_errors(path, model_cfg: DictConfig | None) -> list[str]:
    """A usable checkpoint (``flowmatch.checkpoints``); with ``model_cfg``, holding that architecture (the model
    is built on the meta device: no memory, no time)."""
    try:
        ckpt = read_checkpoint(path, mmap=True)
    except CheckpointError as exc:
        return [str(exc)]
    if model_cfg is None:
        return []
    try:
        with torch.device("meta"):
            model = instantiate(model_cfg)
    except Exception:  # the model's own checks report it when it is built for real
        return []
    message = architecture_error(ckpt, model, OmegaConf.to_container(model_cfg, resolve=True), path)
    return [message] if message else []


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


def stop_nonfinite(exc: Exception, last_ckpt: Path) -> None:
    """Stop after a non-finite training loss (``flowmatch.finite.NonFiniteLoss``) with one line naming the step,
    the last finite loss and the checkpoint kept (exit status 1)."""
    kept = "no checkpoint was written"
    if Path(last_ckpt).exists():
        try:
            step = torch.load(last_ckpt, map_location="cpu", weights_only=False, mmap=True).get("global_step", "?")
        except Exception:
            step = "?"
        kept = f"{last_ckpt} (step {step}) is kept"
    fail(f"{exc}; stopped without evaluating; {kept}. Lower optimizer.lr or check the data", status=1)


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
