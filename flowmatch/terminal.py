"""What a run shows on the terminal and keeps in its log file (``train.log``, ``evaluate.log``).

Every message of a run goes through Python's ``logging``: Hydra configures it per job from
``conf/hydra/job_logging/flowmatch.yaml`` with three handlers: messages to stdout, warnings and errors to stderr,
and everything (with a timestamp) to the run dir's log file, so the file holds what the terminal showed. In a
sweep every terminal line starts with its job's tag (``[job 2/4 interpolant.sigma=0.05]``), so the lines of
parallel jobs can be told apart.

Quiet by default (config key ``verbose: false``): Lightning's banners and tips ("GPU available", "💡 Tip") and
library deprecation warnings are dropped; their warnings still reach the terminal and the log file.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities")
SWEEP_JOBS_ENV = "FLOWMATCH_SWEEP_JOBS"
"""Set by the preflight of a multirun (``flowmatch.sweeps``): the number of jobs, inherited by every job."""
SWEEP_KEYS_ENV = "FLOWMATCH_SWEEP_KEYS"
"""Set by the preflight of a multirun: the comma-separated keys the sweep varies (a job's tag names them)."""

NOISE = (
    ".*does not have many workers.*",
    ".*LeafSpec.*",
    ".*is deprecated.*",
    ".*The '(train|val)_dataloader' does not have.*",
    ".*You called `self.log.*",
)


def log() -> logging.Logger:
    """The ``flowmatch`` logger: every message a run shows."""
    return logging.getLogger("flowmatch")


def _configured() -> bool:
    """Whether a job's logging (``conf/hydra/job_logging/flowmatch.yaml``) is in place: a root handler carries the
    :class:`JobTag` filter (pytest's or a notebook's handlers do not count)."""
    return any(isinstance(f, JobTag) for h in logging.getLogger().handlers for f in h.filters)


def say(message: str) -> None:
    """Show ``message`` on the terminal and keep it in the run's log file (before Hydra configured logging, as in
    the preflight: printed)."""
    if _configured():
        log().info(message)
    else:
        print(message, flush=True)


def error(message: str) -> None:
    """Show an ``error:`` line on stderr (and in the run's log file once Hydra configured logging)."""
    if _configured():
        log().error(f"error: {message}")
    else:
        # one write of the whole line: DDP ranks that stop together share stderr (print's separate newline can
        # interleave their lines)
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()


def quiet(verbose: bool = False) -> None:
    """Route Lightning's own messages and Python warnings through the job's handlers (terminal and log file);
    unless ``verbose``, keep only Lightning's warnings and drop deprecation and known harmless warnings."""
    for name in LIGHTNING_LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(True)
    if verbose:
        return
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for pattern in NOISE:
        warnings.filterwarnings("ignore", pattern)


def job_tag() -> str:
    """``job k/n key=value ...`` for a job of a multirun (the keys the sweep varies), ``""`` for a single run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:  # no Hydra job (a notebook, a test)
        return ""
    if hc.mode != RunMode.MULTIRUN:
        return ""
    total, keys = announced()
    head = f"job {hc.job.num + 1}/{total}" if total else f"job {hc.job.num + 1}"
    return " ".join(p for p in (head, varying(list(hc.overrides.task), keys)) if p)


def announced() -> tuple[int | None, list[str]]:
    """The number of jobs and the varying keys the preflight announced to this sweep (None, []: not a sweep)."""
    total = os.environ.get(SWEEP_JOBS_ENV)
    return (int(total) if total else None), [k for k in os.environ.get(SWEEP_KEYS_ENV, "").split(",") if k]


def varying(job: list[str], keys: list[str]) -> str:
    """The overrides of ``job`` that the sweep varies (``interpolant.sigma=0.05 direction=backward``)."""
    keys = {k.lstrip("+~") for k in keys}
    return " ".join(o for o in job if o.split("=", 1)[0].lstrip("+~") in keys)


class JobTag(logging.Filter):
    """Logging filter that gives every record ``record.job``: ``"[job k/n ...] "`` in a sweep, else ``""``."""

    def __init__(self) -> None:
        super().__init__()
        tag = job_tag()
        self.tag = f"[{tag}] " if tag else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job = self.tag
        return True


class BelowLevel(logging.Filter):
    """Logging filter that passes records below ``level`` (stdout gets info, stderr warnings and errors)."""

    def __init__(self, level: str = "WARNING") -> None:
        super().__init__()
        self.level = logging.getLevelName(level)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level
