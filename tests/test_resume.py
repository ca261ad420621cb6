"""Exact resume (flowmatch/resume.py): a run SIGKILLed after a checkpoint and resumed in its run directory with
``ckpt_path=last`` ends with the metrics.json, gradvar.csv and csv/metrics.csv of the uninterrupted run, bit for
bit on CPU; ``ckpt_path=last`` with nothing to resume is an error; ``auto`` starts fresh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, read_metrics, run_entry

from flowmatch.resume import truncate_after_step

# Gaussian default, fixed pairs, sigma > 0 (eps draws), validation every 10 steps, checkpoints every 20,
# gradient-variance probe every 10: every source of randomness and every file the resume must get right.
RUN = [
    "trainer.max_steps=60",
    "trainer.log_every_n_steps=5",
    "trainer.val_check_interval=10",
    "checkpoint.every_n_train_steps=20",
    "coupling=fixed",
    "coupling.n_pairs=64",
    "interpolant=cfm",
    "interpolant.sigma=0.1",
    "callbacks=gradvar",
    "callbacks.gradvar.every_n_steps=10",
    "callbacks.gradvar.probe_size=40",
    "callbacks.gradvar.plot=false",
    "eval.n_fresh=128",
    "eval.euler_steps=[1,7]",
]


def _kill_after_step(run_dir, step: int) -> None:
    """Start the run with a pause after ``step`` (its checkpoint written) and SIGKILL it there."""
    flag = run_dir.parent / f"{run_dir.name}.paused"
    cmd = [
        sys.executable,
        "train.py",
        "threads=1",
        "trainer.enable_progress_bar=false",
        *RUN,
        "+callbacks.pause._target_=tests.fault_injection.PauseAtStep",
        f"+callbacks.pause.step={step}",
        f"+callbacks.pause.flag={flag}",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not flag.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-3000:]
            proc.stderr.close()
            raise AssertionError(f"the run ended before pausing:\n{err}")
        if time.time() > deadline:
            proc.kill()
            proc.wait()
            proc.stderr.close()
            raise AssertionError("the run did not reach the pause")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_entry("train.py", *RUN, f"hydra.run.dir={ref}")
    _kill_after_step(killed, 30)  # checkpoint at 20; steps 21-30 (rows, probes) are lost and redone
    assert (killed / "checkpoints" / "last.ckpt").exists() and not (killed / "metrics.json").exists()
    run_entry("train.py", *RUN, "ckpt_path=last", f"hydra.run.dir={killed}")

    a, b = read_metrics(ref), read_metrics(killed)
    for m in (a, b):
        m.pop("protocol/ckpt_path", None)  # where the weights came from: differs by design
    assert a == b  # every key, exactly
    for name in ("gradvar.csv", "csv/metrics.csv"):
        assert (ref / name).read_text() == (killed / name).read_text(), name


def test_last_without_checkpoint_is_one_clear_error(tmp_path):
    """Found before Hydra runs: the run dir is not created."""
    run = tmp_path / "run"
    proc = run_entry("train.py", "debug=fast", "ckpt_path=last", f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err[-1].startswith("error: ckpt_path=last: there is no") and "Traceback" not in proc.stderr
    assert len(err) == 1 and not run.exists()


def test_auto_starts_fresh_then_resumes(tmp_path):
    run_entry("train.py", "debug=fast", "ckpt_path=auto", f"hydra.run.dir={tmp_path}")
    assert read_metrics(tmp_path)["train/global_step"] == 20.0
    run_entry("train.py", "debug=fast", "trainer.max_steps=30", "ckpt_path=auto", f"hydra.run.dir={tmp_path}")
    assert read_metrics(tmp_path)["train/global_step"] == 30.0


def test_truncate_after_step_drops_late_rows_and_a_torn_line(tmp_path):
    path = tmp_path / "gradvar.csv"
    path.write_text("step,t_lo,grad_var\n10,0.0,1.5\n20,0.0,2.5\n30,0.0,3.5\n40,0.0,4")  # torn last line
    assert truncate_after_step(path, 20) == 1
    assert path.read_text().splitlines() == ["step,t_lo,grad_var", "10,0.0,1.5", "20,0.0,2.5"]
    assert truncate_after_step(tmp_path / "absent.csv", 5) == 0
