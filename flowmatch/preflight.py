"""Check a command line before any work (``train.py`` and ``evaluate.py`` call :func:`preflight` before Hydra runs,
so before a run directory exists): unknown options and keys, the composed config's values
(``flowmatch/validate.py``), then what the machine and the named files must provide (:func:`run_errors`). With
``-m`` every job of the sweep is checked (:func:`sweep_error`). docs/DESIGN.md, "Errors: what is checked when".
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flowmatch import sweeps
from flowmatch.checkpoints import CheckpointError, architecture_error, read_checkpoint
from flowmatch.entry import fail, sharded_error
from flowmatch.preconditions import output_dir_error, wandb_error
from flowmatch.validate import config_errors

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


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
    if config_name == "train" and ckpt_path in RESUME_KEYWORDS:
        errors += [] if multirun else _resume_errors(ckpt_path, cfg)
    elif ckpt_path is not None and (config_name == "train" or cfg.get("task") in EVAL_TASKS_WITH_CKPT):
        errors += _checkpoint_errors(ckpt_path, cfg.model if config_name == "train" else None)
    return errors


RESUME_KEYWORDS = ("last", "auto")
"""train.py's ``ckpt_path`` keywords: the run dir's ``checkpoints/last.ckpt`` (``auto``: when there is one)."""


def no_last_checkpoint(where: str) -> str:
    """The error line of ``ckpt_path=last`` when ``where`` (the run dir's checkpoint, or a description of the run
    dir) holds no checkpoint."""
    return (
        f"ckpt_path=last: there is no {where} to resume. Resume a run in its own directory: "
        f"`python train.py hydra.run.dir=RUN_DIR ckpt_path=last` (the overrides of the first run too), "
        "or give a checkpoint file, or ckpt_path=auto (resume when there is one, else start fresh)"
    )


def _resume_errors(ckpt_path: str, cfg: DictConfig) -> list[str]:
    """``ckpt_path=last`` or ``auto`` of one train.py run: the run dir's ``checkpoints/last.ckpt``, when it exists,
    checked as a named checkpoint (:func:`_checkpoint_errors`); ``last`` with no such file (or with a new
    timestamped run dir, ``${now:...}``, which cannot hold one) is an error. A run dir that only Hydra's runtime
    can resolve (``${hydra...}``) is left to train.py."""
    raw = str(OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"])
    if "${now:" in raw:
        fresh = no_last_checkpoint(f"checkpoint in a new run dir (hydra.run.dir={raw!r})")
        return [fresh] if ckpt_path == "last" else []
    if "${hydra" in raw:
        return []
    try:
        last = Path(str(cfg.hydra.run.dir)) / "checkpoints" / "last.ckpt"
    except Exception:  # an interpolation only the run resolves: train.py checks
        return []
    if last.exists():
        return _checkpoint_errors(last, cfg.model)
    return [no_last_checkpoint(str(last))] if ckpt_path == "last" else []


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
