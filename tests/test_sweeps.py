"""Sweeps that survive a bad job: every job is validated before the first starts (one message naming the invalid
jobs, nothing written), and a job that fails at run time is reported at the end while the others finish, under the
basic, joblib and submitit launchers (flowmatch/sweeps.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, run_entry

from flowmatch.sweeps import bad_jobs_message, expand_jobs, report, varying

FAST = ["debug=fast", "eval.n_fresh=200", "eval.euler_steps=[1]"]
# job 1 and job 3 diverge at step 1 (the loss is inf); job 2 trains
LRS = ["scheduler=constant", "optimizer.lr=1e4,0.001,1e4"]


def test_expand_jobs_is_hydras_cartesian_product(tmp_path):
    """The jobs the preflight checks are the jobs Hydra launches: the same overrides, in the same order (compared
    with the .hydra/overrides.yaml each launched job writes)."""
    args = ["-m", "debug=fast", "interpolant=cfm", "interpolant.sigma=0.0,0.05", "direction=forward,backward"]
    jobs, keys = expand_jobs(args)
    assert keys == ["interpolant.sigma", "direction"] and len(jobs) == 4
    sweep = tmp_path / "sweep"
    run_entry(
        "train.py",
        *args,
        "trainer.max_steps=1",
        "eval.enabled=false",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",
    )
    launched = [yaml.safe_load((sweep / str(k) / ".hydra" / "overrides.yaml").read_text()) for k in range(4)]
    for job, got in zip(jobs, launched, strict=True):
        assert [o for o in got if o.split("=")[0] in keys] == [o for o in job if o.split("=")[0] in keys]


def test_bad_jobs_message_names_each_bad_job_once():
    jobs = [["a=1", "s=0"], ["a=1", "s=-1"], ["a=1", "s=x"]]
    msg = bad_jobs_message([None, "s must be >= 0, got -1", "s must be a number, got 'x'"], jobs, ["s"])
    assert msg.splitlines()[0].startswith("2 of 3 jobs of this sweep are invalid; nothing was started")
    assert "job 2 (s=-1): s must be >= 0" in msg and "job 3 (s=x): s must be a number" in msg
    assert bad_jobs_message([None, None, None], jobs, ["s"]) is None
    # a mistake that every job shares is reported as itself
    assert bad_jobs_message(["bad key"] * 3, jobs, ["s"]) == "bad key"
    assert varying(["+x.y=1", "s=2"], ["+x.y"]) == "+x.y=1"


def test_invalid_jobs_are_reported_before_any_job_starts(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_entry(
        "train.py",
        "-m",
        *FAST,
        "interpolant=cfm",
        "interpolant.sigma=0.05,-1,0",
        "trainer.max_steps=2,abc",
        f"hydra.sweep.dir={sweep}",
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "error: 4 of 6 jobs of this sweep are invalid; nothing was started (fix or drop them):"
    assert [ln.split(" (")[0].strip() for ln in lines[1:]] == ["job 2", "job 3", "job 4", "job 6"]
    assert "interpolant.sigma must be a number >= 0, got -1" in lines[2]
    assert "trainer.max_steps must be an integer >= 1, got 'abc'" in lines[1]
    assert not sweep.exists()  # nothing was started, nothing was written


@pytest.mark.parametrize("launcher", ["basic", "joblib_cpu", "submitit_local"])
def test_a_failing_job_is_reported_at_the_end_and_the_others_finish(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    proc = run_entry(
        "train.py",
        "-m",
        *FAST,
        *LRS,
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",
        check=False,
        timeout=400,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (sweep / "1" / "metrics.json").exists()  # the healthy job finished and evaluated
    assert not (sweep / "0" / "metrics.json").exists() and not (sweep / "2" / "metrics.json").exists()
    summary = proc.stdout[proc.stdout.index("flowmatch: sweep finished") :].splitlines()
    assert summary[0] == f"flowmatch: sweep finished: 1 of 3 jobs completed ({sweep})"
    assert summary[1].startswith("  job 1 (optimizer.lr=10000.0) failed: the training loss is inf at step 1")
    assert summary[2].startswith("  job 3 (optimizer.lr=10000.0) failed:") and len(summary) == 3
    status = json.loads((sweep / ".job_status" / "0.json").read_text())
    assert status["status"] == "failed" and status["exit_status"] == 1
    # the job's log file holds the error line it showed
    assert "error: the training loss is inf at step 1" in (sweep / "0" / "train.log").read_text()


def test_an_exception_in_a_job_is_one_line_and_the_sweep_goes_on(tmp_path):
    """A fault that is not a user's mistake (here an injected RuntimeError, like CUDA out of memory): one error
    line, the traceback in the job's train.log only, the other job finishes."""
    sweep = tmp_path / "sweep"
    proc = run_entry(
        "train.py",
        "-m",
        *FAST,
        "+callbacks.fault._target_=tests.fault_injection.RaiseAtStep",
        "+callbacks.fault.step=3,1000",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert line.startswith("[job 1/2 +callbacks.fault.step=3] error: RuntimeError: injected fault (traceback in")
    assert "Traceback" in (sweep / "0" / "train.log").read_text()
    assert (sweep / "1" / "metrics.json").exists()
    assert "  job 1 (+callbacks.fault.step=3) failed: RuntimeError: injected fault" in proc.stdout


def test_report_counts_jobs_that_never_reported(tmp_path):
    """A job whose process was killed writes no status: the report says so instead of calling the sweep a
    success."""
    (tmp_path / ".job_status").mkdir()
    done = {"job": 1, "status": "completed", "overrides": ["s=0"], "run_dir": "r", "log": "r/train.log"}
    (tmp_path / ".job_status" / "0.json").write_text(json.dumps(done))
    (tmp_path / ".job_status" / "1.json").write_text('{"job": 2, "sta')  # torn: counts as missing
    text, failed = report(tmp_path, 3, ["s"])
    assert text.splitlines()[0] == f"flowmatch: sweep finished: 1 of 3 jobs completed ({tmp_path})"
    assert [f["job"] for f in failed] == [2, 3] and "job 3 did not report" in text


def test_sweep_without_failures_exits_0(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", *FAST, "seed=0,1", "threads=1", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"flowmatch: sweep finished: 2 of 2 jobs completed ({Path(tmp_path)})" in proc.stdout
