"""Config validation before any work: the rule tables of ``flowmatch/config_rules.py`` (one per config group) and
checks across keys, on the composed config.

``config_errors(cfg, reference, overrides)`` returns the problems of a composed ``train`` or ``evaluate`` config,
each one line that names the key, the value and what is allowed, in the order: missing mandatory values (``???``),
the types of the command line's value overrides (against the type of the value they replace), the rule tables,
then checks across keys. ``preflight`` (``flowmatch/preflight.py``) runs it before Hydra creates the run
directory, so a config error leaves nothing behind. The components' constructors check again (a notebook user
builds them without Hydra); the tables make those checks happen before the run directory and name the key.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from flowmatch.config_rules import BINS, TABLES, TASKS, is_int, is_num

IMAGE_FOLDER_HOW = "the folder of your images (data=image_folder: *.png, *.jpg, ... searched recursively)"
REFLOW_HOW = (
    "make it with `python evaluate.py task=reflow_pairs ckpt_path=RUN/checkpoints/last.ckpt` "
    "(it writes reflow_pairs.pt into its run dir)"
)


def _value(cfg: DictConfig, key: str):
    """(True, resolved plain value) of ``key``, or (False, None) when it is absent or cannot be resolved here
    (``${hydra:...}`` interpolations resolve only inside Hydra's run)."""
    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception:
        return False, None
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return True, OmegaConf.to_container(node, resolve=True)
        except Exception:
            return False, None
    return (node is not None or _has(cfg, key)), node


def _has(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


def missing_values(cfg: DictConfig) -> list[str]:
    """Mandatory values (``???``) left unset, with how to set them."""
    out = []

    def walk(node, prefix: str) -> None:
        for key in node:
            full = f"{prefix}{key}"
            if full == "hydra":
                continue
            if OmegaConf.is_missing(node, key):
                how = {"coupling.pairs_path": f"; {REFLOW_HOW}", "data.root": f"; {IMAGE_FOLDER_HOW}"}.get(full, "")
                out.append(f"{full} is required here (set {full}=...){how}")
            elif isinstance(node._get_node(key), DictConfig):
                walk(node[key], f"{full}.")

    walk(cfg, "")
    return out


def _type_name(v) -> str | None:
    if isinstance(v, bool):
        return "true or false"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, list):
        return "a list"
    return None


def _same_type(new, old) -> bool:
    """Whether ``new`` may replace ``old``: a bool by a bool, a list by a list, an integer by an integer, a number
    by a number (or a list of numbers: vector forms such as ``data.mean``); other types are not compared."""
    if isinstance(old, (bool, list)):
        return isinstance(new, type(old))
    if isinstance(old, int):
        return is_int(new)
    return is_num(new) or isinstance(new, list) if isinstance(old, float) else True


def override_type_errors(cfg: DictConfig, reference: DictConfig, keys: list[str]) -> list[str]:
    """Value overrides whose type differs from the value they replace (``trainer.max_steps=abc``), for keys no
    table covers (the tables say more)."""
    out = []
    for key in keys:
        group, _, leaf = key.rpartition(".")
        if leaf in TABLES.get(group, {}):
            continue
        (has_new, new), (has_old, old) = _value(cfg, key), _value(reference, key)
        expected = _type_name(old) if has_old else None
        if has_new and expected and not _same_type(new, old):
            out.append(f"{key} must be {expected} (like its default {old!r}), got {new!r}")
    return out


def table_errors(cfg: DictConfig) -> list[str]:
    """Every table rule whose key is in ``cfg`` and whose value it does not allow."""
    out = []
    for group, rules in TABLES.items():
        for leaf, rule in rules.items():
            key = f"{group}.{leaf}" if group else leaf
            found, value = _value(cfg, key)
            if found and not rule.ok(value):
                out.append(f"{key} must be {rule.allowed}, got {value!r}")
    return out


def _bin_count(bins) -> int:
    return bins if is_int(bins) else len(bins) - 1


def cross_errors(cfg: DictConfig) -> list[str]:
    """Checks across keys: probe sizes vs bins, a linear interpolant's sigma, kept trajectories vs Euler steps, task
    names, the reflow pairs file."""
    out = []
    for name in ("gradvar", "gradvar_integrated", "memorization"):
        _, size = _value(cfg, f"callbacks.{name}.probe_size")
        _, bins = _value(cfg, f"callbacks.{name}.bins")
        if is_int(size) and BINS.ok(bins) and size % _bin_count(bins):
            k = _bin_count(bins)
            out.append(
                f"callbacks.{name}.probe_size={size} is not a multiple of the {k} bins (callbacks.{name}.bins): the "
                f"probe holds an equal count per bin; use {size // k * k or k} or {(size // k + 1) * k}"
            )
    _, target = _value(cfg, "interpolant._target_")
    _, sigma = _value(cfg, "interpolant.sigma")
    if str(target).endswith(".Linear") and is_num(sigma) and sigma != 0:
        out.append(f"interpolant.sigma must be 0 for interpolant=linear, got {sigma!r} (use interpolant=cfm or bridge)")
    _, keep = _value(cfg, "eval.keep_trajectories")
    _, steps = _value(cfg, "eval.euler_steps")
    if isinstance(keep, list) and isinstance(steps, list) and set(keep) - set(steps):
        out.append(
            f"eval.keep_trajectories={keep} names step counts not in eval.euler_steps={steps}: only those are "
            f"integrated (add them to eval.euler_steps)"
        )
    found, task = _value(cfg, "task")
    if found and task not in TASKS:
        out.append(f"task must be one of {list(TASKS)}, got {task!r}")
    _, path = _value(cfg, "coupling.pairs_path")
    if isinstance(path, str) and not Path(path).is_file():
        out.append(f"coupling.pairs_path={path!r} is not a file; {REFLOW_HOW}")
    return out


def config_errors(cfg: DictConfig, reference: DictConfig | None = None, overrides: list[str] = ()) -> list[str]:
    """All problems of a composed config, first the most basic. ``reference``: the same config composed with the
    command line's group choices only (the types the value overrides must keep); ``overrides``: the keys the
    command line set."""
    errors = missing_values(cfg)
    if reference is not None:
        errors += override_type_errors(cfg, reference, list(overrides))
    return errors + table_errors(cfg) + cross_errors(cfg)
