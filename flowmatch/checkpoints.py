"""Reading a checkpoint that a user names (``ckpt_path``) with one clear error line for each way it can be wrong:
missing, a directory, truncated or not a PyTorch file, not a Lightning checkpoint, not written by flowmatch's
``train.py`` (no stored config), or holding another architecture than the config asks for."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is the one line to show."""


def read_checkpoint(path, mmap: bool = False) -> dict:
    """The checkpoint dict at ``path`` (on the CPU; ``mmap``: tensors mapped, not read, for a cheap look), or
    :class:`CheckpointError` saying what is wrong with it."""
    p = Path(str(path))
    if not p.exists():
        raise CheckpointError(f"ckpt_path={str(p)!r} does not exist (give a checkpoint file written by train.py)")
    if p.is_dir():
        raise CheckpointError(f"ckpt_path={str(p)!r} is a directory; give a file such as RUN/checkpoints/last.ckpt")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:
        if mmap and "mmap" in str(exc):  # an old, non-zip torch.save format: read it whole
            return read_checkpoint(path, mmap=False)
        reason = " ".join(str(exc).split()).split(". ")[0][:120] or type(exc).__name__
        raise CheckpointError(
            f"ckpt_path={str(p)!r} cannot be read as a checkpoint: it is truncated or not a PyTorch file ({reason})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        what = f"a {type(ckpt).__name__}" + (
            f" with keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict) else ""
        )
        raise CheckpointError(f"ckpt_path={str(p)!r} is not a training checkpoint (no state_dict; it holds {what})")
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"ckpt_path={str(p)!r} was not written by flowmatch's train.py (no stored config)")
    return ckpt


def _describe(model_cfg: dict) -> str:
    target = str(model_cfg.get("_target_", "?")).rsplit(".", 1)[-1]
    keys = ", ".join(f"{k}={v}" for k, v in model_cfg.items() if not str(k).startswith("_") and not isinstance(v, dict))
    return f"{target}({keys})"


def architecture_error(ckpt: dict, model: nn.Module, model_cfg: dict, path) -> str | None:
    """Why the checkpoint's weights do not fit ``model`` (built from the config's ``model_cfg``; may live on the
    meta device), naming the first parameter that differs and both model configs; None when they fit."""
    stored = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    wanted = model.state_dict()
    problem = None
    for name in sorted(set(stored) | set(wanted)):
        if name not in stored or name not in wanted:
            where = "the config's model" if name not in stored else "the checkpoint"
            problem = f"parameter {name} is only in {where}"
            break
        if tuple(stored[name].shape) != tuple(wanted[name].shape):
            problem = f"{name} is {tuple(stored[name].shape)} there, {tuple(wanted[name].shape)} here"
            break
    if problem is None:
        return None
    theirs = ckpt["hyper_parameters"]["config"]["model"]
    return (
        f"ckpt_path={str(path)!r} holds another architecture than the config asks for ({problem}): the checkpoint's "
        f"model is {_describe(theirs)}, the config's {_describe(model_cfg)}"
    )
