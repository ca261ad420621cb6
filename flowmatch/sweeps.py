"""Sweeps that survive a bad job (``python train.py --multirun ...``), under every Hydra launcher.

1. Before the first job starts, the preflight (``flowmatch.preflight.preflight``) expands the sweep into its jobs
   (:func:`expand_jobs`) and checks each one; one message lists the invalid jobs (:func:`bad_jobs_message`) and
   nothing starts. It also tells every job how many jobs there are and which keys vary (environment variables read
   by ``flowmatch.terminal.job_tag``).
2. A job that fails at run time (an ``error:`` line, a non-finite loss, an exception such as CUDA out of memory)
   does not stop the sweep: :func:`job_guard` records its failure in ``<sweep dir>/.job_status/<num>.json`` and
   the job returns, so the launcher (basic, joblib or submitit) goes on with the others.
3. When the sweep ends, :class:`SweepReport` (a Hydra callback, ``hydra.callbacks`` in ``conf/train.yaml``) lists
   the failed jobs and those that never reported (a killed process), and :func:`exit_status` makes the command
   exit with 1 when any job failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from flowmatch import terminal
from flowmatch.terminal import varying

STATUS_DIR = ".job_status"
_FAILED: list[dict] = []  # the failed jobs of the sweep this process launched (filled by SweepReport)


def is_multirun(args: list[str]) -> bool:
    """Whether a command line asks for a multirun."""
    return any(a in ("-m", "--multirun") for a in args)


def expand_jobs(args: list[str]) -> tuple[list[list[str]], list[str]] | None:
    """The override list of every job of a multirun command line, in Hydra's order (the basic sweeper's cartesian
    product), and the keys the sweep varies; None when the sweep cannot be expanded without the config (``glob``,
    ranges of floats)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # a syntax error (reported by the single-job check) or a sweep needing the config
        return None
    keys = [ov.key_or_group for ov in parsed if ov.is_sweep_override()]
    return [job for batch in batches for job in batch], keys


def announce(n_jobs: int, keys: list[str]) -> None:
    """Tell the jobs (through the environment every launcher passes on) their number and the varying keys."""
    os.environ[terminal.SWEEP_JOBS_ENV] = str(n_jobs)
    os.environ[terminal.SWEEP_KEYS_ENV] = ",".join(k.lstrip("+~") for k in keys)


def bad_jobs_message(errors: list[str | None], jobs: list[list[str]], keys: list[str]) -> str | None:
    """One message for the invalid jobs of a sweep (None: every job is valid); the error itself when every job has
    the same one (a mistake outside the swept keys)."""
    bad = [(k, e) for k, e in enumerate(errors) if e]
    if not bad:
        return None
    if len(bad) == len(jobs) and len({e for _, e in bad}) == 1:
        return bad[0][1]
    lines = [f"  job {k + 1} ({varying(jobs[k], keys)}): {e}" for k, e in bad]
    head = f"{len(bad)} of {len(jobs)} jobs of this sweep are invalid; nothing was started (fix or drop them):"
    return "\n".join([head, *lines])


def _status_path(hc) -> Path | None:
    """``<sweep dir>/.job_status/<num>.json`` of the running multirun job, None outside a multirun."""
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(hc.sweep.dir) / STATUS_DIR / f"{hc.job.num}.json"


def _write_status(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def job_guard(run_dir: Path):
    """Run one job of a multirun so that its failure is recorded and does not stop the sweep: an ``error:`` exit
    (``SystemExit`` with a non-zero status) or an exception becomes a ``failed`` status (with the error line) and
    the job returns normally. Outside a multirun (and on ranks > 0 of a DDP job) it changes nothing."""
    hc = HydraConfig.get()
    path = _status_path(hc)
    if path is None or int(os.environ.get("LOCAL_RANK", 0)) or int(os.environ.get("NODE_RANK", 0)):
        yield
        return
    log_file = str(Path(run_dir) / f"{hc.job.name}.log")
    record = {"job": hc.job.num + 1, "overrides": list(hc.overrides.task), "run_dir": str(run_dir), "log": log_file}
    start, outcome = time.perf_counter(), {"status": "completed"}
    try:
        yield
    except SystemExit as exc:
        if exc.code not in (0, None):
            message = getattr(exc, "message", None) or f"exit status {exc.code}"
            outcome = {"status": "failed", "message": message, "exit_status": exc.code}
    except Exception as exc:  # a fault at run time (e.g. out of memory): reported, the sweep goes on
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        logging.getLogger("flowmatch.detail").debug("".join(traceback.format_exception(exc)))
        terminal.error(f"{message} (traceback in {log_file})")
        outcome = {"status": "failed", "message": message, "exit_status": 1}
    _write_status(path, {**record, **outcome, "seconds": time.perf_counter() - start})


def read_statuses(sweep_dir: Path) -> dict[int, dict]:
    """The status records of a sweep dir by job number (1-based); an unreadable file counts as missing."""
    out = {}
    for p in sorted((Path(sweep_dir) / STATUS_DIR).glob("*.json")):
        with contextlib.suppress(ValueError, OSError):
            record = json.loads(p.read_text())
            out[int(record["job"])] = record
    return out


def report(sweep_dir: Path, n_jobs: int | None, keys: list[str] | None = None) -> tuple[str, list[dict]]:
    """The end-of-sweep summary (a failed job named by the ``keys`` the sweep varies, all its overrides without
    them) and the failed (or unreported) jobs."""
    statuses = read_statuses(sweep_dir)
    n = n_jobs or max(statuses, default=0)
    failed = [r for r in statuses.values() if r["status"] != "completed"]
    missing = [k for k in range(1, n + 1) if k not in statuses]
    done = n - len(failed) - len(missing)
    lines = [f"flowmatch: sweep finished: {done} of {n} jobs completed ({sweep_dir})"]
    for r in sorted(failed, key=lambda r: r["job"]):
        which = varying(r["overrides"], keys) if keys else " ".join(r["overrides"])
        lines.append(f"  job {r['job']} ({which}) failed: {r['message']} [log: {r['log']}]")
    for k in missing:
        lines.append(f"  job {k} did not report (killed, or still running elsewhere); see its log file")
    return "\n".join(lines), failed + [{"job": k, "status": "missing"} for k in missing]


class SweepReport(Callback):
    """Hydra callback of the launching process: clears the old job statuses when a sweep starts and prints
    :func:`report` when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        shutil.rmtree(Path(config.hydra.sweep.dir) / STATUS_DIR, ignore_errors=True)
        _FAILED.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        text, failed = report(Path(config.hydra.sweep.dir), *terminal.announced())
        _FAILED.extend(failed)
        print(text, flush=True)


def exit_status() -> int:
    """1 when a job of the sweep this process ran failed or did not report, else 0."""
    return 1 if _FAILED else 0
