"""What the machine must provide before a run starts: a writable output directory and, for ``logger=wandb``,
either an API key or an offline mode. Each check returns one error line (or None) and does no network I/O."""

from __future__ import annotations

import netrc
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

OFFLINE_MODES = ("offline", "dryrun", "disabled")


def output_dir_error(raw_dir: str, key: str) -> str | None:
    """Why the run directory ``raw_dir`` (Hydra's ``hydra.run.dir`` / ``hydra.sweep.dir`` before interpolation,
    config key ``key``) cannot be created or written, or None. Checks the part before the first ``${``: its
    deepest existing ancestor must be a directory in which a file can be created (the probe file is removed;
    nothing is created when the check fails)."""
    literal = raw_dir.split("${", 1)[0]
    path = Path(literal if literal.endswith("/") or literal == raw_dir else Path(literal or ".").parent or ".")
    path = Path(os.path.abspath(path))
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}={raw_dir!r} cannot be created: {str(existing)!r} is a file, not a directory (choose {key}=DIR)"
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".flowmatch-write-check-")
    except OSError as exc:
        return (
            f"{key}={raw_dir!r} cannot be created: {str(existing)!r} is not writable ({exc.strerror}); "
            f"choose a writable {key}=DIR"
        )
    os.close(fd)
    os.unlink(probe)
    return None


def _settings_mode(path: Path) -> str | None:
    """The ``mode = ...`` line of a wandb settings file (written by ``wandb offline``), or None."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            if name.strip() == "mode":
                return value.strip()
    except OSError:
        return None
    return None


def _netrc_has_key(host: str) -> bool:
    """Whether a netrc file (``NETRC`` or ~/.netrc, ~/_netrc: where ``wandb login`` writes) has a password for host."""
    candidates = [os.environ.get("NETRC")] if os.environ.get("NETRC") else []
    candidates += [os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")]
    for path in candidates:
        try:
            auth = netrc.netrc(path).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            continue
        if auth and auth[2]:
            return True
    return False


def wandb_error(logger_cfg: dict) -> str | None:
    """For ``logger=wandb``: None when runs can be logged (an offline or disabled mode, or an API key in
    ``WANDB_API_KEY`` or a netrc file), else the line that says how to choose."""
    if logger_cfg.get("offline") is True or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return None
    if os.environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES or os.environ.get("WANDB_API_KEY"):
        return None
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    wandb_dir = Path(os.environ.get("WANDB_DIR", ".")) / "wandb"
    for settings in (wandb_dir / "settings", config_dir / "settings"):
        if (_settings_mode(settings) or "").lower() in OFFLINE_MODES:
            return None
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if _netrc_has_key(host):
        return None
    return (
        "logger=wandb has no API key (WANDB_API_KEY, or ~/.netrc from `wandb login`) and no offline mode: run "
        "`wandb login`, or log offline with WANDB_MODE=offline (sync later with `wandb sync`), or use logger=csv"
    )
