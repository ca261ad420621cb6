"""Numerical faults and unusable checkpoints: a non-finite loss stops training with one line and keeps the last
finite checkpoint; a checkpoint that is truncated, not a checkpoint, not flowmatch's or of another architecture
stops train.py and evaluate.py with one line before any work."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, run_entry

from flowmatch.finite import LossGuard, NonFiniteLoss, first_nonfinite

FAST = ["debug=fast", "trainer.enable_progress_bar=false"]
# The learning rate grows 10x per step (1e-3 * 10^k): the loss overflows after step 10 of 20 (seeded, on the CPU).
DIVERGE = [
    "scheduler=constant",
    "scheduler._target_=torch.optim.lr_scheduler.ExponentialLR",
    "~scheduler.factor",
    "+scheduler.gamma=10",
    "checkpoint.every_n_train_steps=2",
]


def error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    d = tmp_path_factory.mktemp("diverged")
    return d, run_entry("train.py", *FAST, *DIVERGE, f"hydra.run.dir={d}", check=False)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_finite_checkpoint(diverged):
    run_dir, proc = diverged
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    m = re.search(r"the training loss is (nan|inf) at step (\d+) \(last finite loss (\S+) at step (\d+)\)", line)
    assert m, line
    bad_step, last_step = int(m.group(2)), int(m.group(4))
    assert last_step == bad_step - 1 and 2 <= bad_step < 20
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] <= bad_step and ckpt["global_step"] % 2 == 0  # the last save before the fault
    assert f"(step {ckpt['global_step']}) is kept" in line
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (run_dir / "metrics.json").exists()  # no evaluation of a diverged model


def test_nan_at_the_first_steps_writes_no_checkpoint(tmp_path):
    proc = run_entry(
        "train.py", *FAST, "optimizer.lr=1e4", "scheduler=constant", f"hydra.run.dir={tmp_path}", check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "at step 1 (last finite loss" in line and "no checkpoint was written" in line
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_loss_guard_lazy_reports_the_first_bad_step_and_last_finite_loss():
    """On an accelerator the guard keeps its state on the device and reads it only at check()."""
    guard = LossGuard(lazy=True)
    for step, value in enumerate([3.0, 2.0, float("inf"), float("nan"), 1.0]):
        guard.update(torch.tensor(value), step)
    with pytest.raises(NonFiniteLoss) as info:
        guard.check()
    assert (info.value.step, info.value.last_finite, info.value.last_finite_step) == (2, 2.0, 1)
    assert info.value.value == float("inf")


def test_loss_guard_at_once_on_cpu_and_weights():
    guard = LossGuard()
    guard.update(torch.tensor(1.5, requires_grad=True), 0)
    with pytest.raises(NonFiniteLoss, match=r"nan at step 1 \(last finite loss 1.5 at step 0\)"):
        guard.update(torch.tensor(float("nan")), 1)
    guard.check_weights([torch.ones(3)], 5)
    with pytest.raises(NonFiniteLoss, match="weights are not finite after step 4"):
        guard.check_weights([torch.ones(3), torch.tensor([0.0, float("inf")])], 5)


def test_first_nonfinite_agrees_on_the_first_bad_step_over_ranks():
    """The ranks' states (last finite loss, its step, first bad step, bad value) -> the error every rank raises."""
    nan, inf = float("nan"), float("inf")

    def table(*rows):
        return torch.tensor(rows, dtype=torch.float64)

    assert first_nonfinite(table([0.5, 9, -1, 0], [0.7, 9, -1, 0])) is None
    # rank 1's loss went bad at step 5; rank 0 saw the NaN weights one step later (and rank 2 at step 6 too)
    err = first_nonfinite(table([0.9, 5, 6, nan], [0.4, 4, 5, inf], [0.8, 5, 6, 1.0]))
    assert (err.step, err.ranks, err.world, err.last_finite, err.last_finite_step) == (5, (1,), 3, 0.4, 4)
    assert str(err) == "the training loss is inf at step 5 on rank 1 of 3 (last finite loss 0.4 at step 4 on rank 1)"
    both = first_nonfinite(table([nan, -1, 0, nan], [0.2, 1, 2, nan]))
    assert both.step == 0 and both.ranks == (0,) and "no finite loss before it" in str(both)
    tie = first_nonfinite(table([0.3, 2, 3, nan], [0.2, 2, 3, nan]))
    assert tie.ranks == (0, 1) and "on ranks 0, 1 of 2" in str(tie) and tie.last_finite == 0.3


@pytest.mark.slow
def test_loss_guards_of_two_gloo_ranks_raise_the_same_error_at_the_same_check(tmp_path):
    """tests/guard_ranks.py: NaN on rank 1 alone at step 3 (every rank from step 4). Neither rank raises at the update
    (the CPU guard of one process would), the check at step 2 passes on both, the check at step 5 raises on both
    the same error naming step 3, rank 1 and rank 1's last finite loss (rank 0's was finite at step 3 too); the
    same with the lazy (accelerator) guard. The weights check names rank 0's last finite loss on both ranks."""
    proc = subprocess.run(
        [sys.executable, "tests/guard_ranks.py", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss = "the training loss is nan at step 3 on rank 1 of 2 (last finite loss 0.433333 at step 2 on rank 1)"
    weights = "the weights are not finite after step 2 (last finite loss 0.333333 at step 2 on rank 0)"
    for rank in (0, 1):
        for lazy, got in json.loads((tmp_path / f"rank{rank}.json").read_text()).items():
            assert got == {"update": None, "checks": {"2": None, "5": loss}, "weights": weights}, (rank, lazy)


@pytest.mark.slow
@pytest.mark.parametrize(
    "value,rank,step,max_steps,save_every,kept,delay",
    [
        ("nan", 1, 5, 12, 2, 4, 6),  # stopped by the check before the checkpoint of step 6
        ("inf", 0, 9, 11, 4, 8, 0),  # after the last log step and checkpoint: stopped at the end of training
    ],
)
def test_nonfinite_loss_on_one_ddp_rank_stops_every_rank_with_one_line(
    value, rank, step, max_steps, save_every, kept, delay, tmp_path
):
    """trainer=ddp_cpu (2 gloo processes): the loss is non-finite on one rank alone at ``step``; the gradient
    all-reduce then spreads NaN weights to the other rank. Both ranks stop at the guard's next check with the same
    line naming the step and the rank, exit status 1, no hang, no evaluation; last.ckpt is the finite one of step
    ``kept``, written before the fault. ``delay``: rank 0 takes that long to exit; rank 1 must not exit before it
    (Lightning's launcher would SIGKILL rank 0: status -9)."""
    fault = "tests.fault_injection.NonFiniteOnRank"
    cmd = [
        sys.executable, "train.py", "threads=1", "trainer=ddp_cpu", *FAST, "data.batch_size=8", "logger=none",
        f"trainer.max_steps={max_steps}", "trainer.log_every_n_steps=4", f"trainer.val_check_interval={max_steps}",
        f"checkpoint.every_n_train_steps={save_every}", f"+callbacks.fault._target_={fault}",
        f"+callbacks.fault.step={step}", f"+callbacks.fault.rank={rank}", f"+callbacks.fault.value={value}",
        f"+callbacks.fault.rank0_exit_delay_s={delay}", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks (rank 1 is rank 0's child)
        proc.communicate()
        pytest.fail(f"the DDP run hung after a {value} loss on rank {rank}")
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2 and len(set(lines)) == 1, stderr[-4000:]  # one line per rank, the same on both
    head = rf"{value} at step {step} on rank {rank} of 2 \(last finite loss \S+ at step {step - 1} on rank {rank}\)"
    assert re.search(head, lines[0]) and f"last.ckpt (step {kept}) is kept" in lines[0], lines[0]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == kept and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (tmp_path / "metrics.json").exists()


@pytest.fixture(scope="module")
def checkpoints(diverged, tmp_path_factory):
    """A real flowmatch checkpoint (the diverged run's last finite one) and broken variants of it."""
    d = tmp_path_factory.mktemp("ckpts")
    good = diverged[0] / "checkpoints" / "last.ckpt"
    data = good.read_bytes()
    (d / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (d / "text.ckpt").write_text("not a checkpoint\n")
    torch.save({"x0": torch.zeros(3, 2), "x1": torch.ones(3, 2)}, d / "pairs.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {}}, d / "foreign.ckpt")
    return good, d


@pytest.mark.parametrize(
    "name,expected",
    [
        ("missing.ckpt", "does not exist"),
        ("truncated.ckpt", "truncated or not a PyTorch file"),
        ("text.ckpt", "truncated or not a PyTorch file"),
        ("pairs.pt", "not a training checkpoint"),
        ("foreign.ckpt", "not written by flowmatch"),
    ],
)
def test_bad_checkpoint_one_line_before_any_work(checkpoints, name, expected, tmp_path, capsys):
    """In process through preflight (what train.py and evaluate.py run before Hydra), both entry points."""
    from flowmatch.preflight import preflight

    path = checkpoints[1] / name
    for entry in ("train", "evaluate"):
        with pytest.raises(SystemExit) as info:
            preflight(entry, [f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}"])
        assert info.value.code == 2
        (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert expected in line and str(path) in line
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_architecture(checkpoints, tmp_path, capsys):
    from flowmatch.preflight import preflight

    good = checkpoints[0]
    preflight("train", [f"ckpt_path={good}", f"hydra.run.dir={tmp_path}"])  # the same architecture passes
    with pytest.raises(SystemExit):
        preflight("train", [f"ckpt_path={good}", "model.width=64", f"hydra.run.dir={tmp_path}"])
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert "another architecture" in line and "width=256" in line and "width=64" in line


def _preflight_error(capsys, *args: str) -> str:
    """The one error line of train.py's preflight (exit status 2) for the command line ``args``."""
    from flowmatch.preflight import preflight

    with pytest.raises(SystemExit) as info:
        preflight("train", list(args))
    assert info.value.code == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    return line


@pytest.mark.parametrize(
    "name,expected",
    [
        ("truncated.ckpt", "truncated or not a PyTorch file"),
        ("text.ckpt", "truncated or not a PyTorch file"),
        ("pairs.pt", "not a training checkpoint"),
        ("foreign.ckpt", "not written by flowmatch"),
    ],
)
def test_resume_keywords_check_the_run_dirs_last_checkpoint_before_any_work(
    checkpoints, name, expected, tmp_path, capsys
):
    """ckpt_path=last and auto with hydra.run.dir=DIR: a DIR/checkpoints/last.ckpt is checked as a named file."""
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    shutil.copy(checkpoints[1] / name, last)
    for keyword in ("last", "auto"):
        line = _preflight_error(capsys, f"ckpt_path={keyword}", f"hydra.run.dir={tmp_path / 'run'}")
        assert expected in line and str(last) in line, line
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "run",
        "run/checkpoints",
        "run/checkpoints/last.ckpt",
    ]  # nothing written: no .hydra/, no log


def test_resume_keywords_check_the_architecture_and_a_missing_last(checkpoints, tmp_path, capsys):
    from flowmatch.preflight import preflight

    run = tmp_path / "run"
    line = _preflight_error(capsys, "ckpt_path=last", f"hydra.run.dir={run}")  # no checkpoint there
    assert line.startswith("error: ckpt_path=last: there is no") and str(run / "checkpoints" / "last.ckpt") in line
    line = _preflight_error(capsys, "ckpt_path=last")  # the default run dir is a new, timestamped one
    assert "there is no checkpoint in a new run dir" in line and "${now:" in line
    preflight("train", ["ckpt_path=auto", f"hydra.run.dir={run}"])  # auto: a fresh start
    assert not run.exists()
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoints[0], run / "checkpoints" / "last.ckpt")
    for keyword in ("last", "auto"):
        preflight("train", [f"ckpt_path={keyword}", f"hydra.run.dir={run}"])  # the same architecture passes
        line = _preflight_error(capsys, f"ckpt_path={keyword}", "model.width=64", f"hydra.run.dir={run}")
        assert "another architecture" in line and "width=256" in line and "width=64" in line
    assert preflight("train", ["-m", "ckpt_path=last", f"hydra.sweep.dir={tmp_path / 'sweep'}"]) is None  # per job


def test_evaluate_truncated_checkpoint_subprocess(checkpoints, tmp_path):
    proc = run_entry(
        "evaluate.py", f"ckpt_path={checkpoints[1] / 'truncated.ckpt'}", f"hydra.run.dir={tmp_path / 'r'}", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(error_lines(proc)) == 1 and not (tmp_path / "r").exists()


def test_unusable_field_is_one_integration_error():
    """A finite but diverged field: dopri5's step-size underflow and NaN endpoints are one clear error each."""
    from flowmatch.evaluation import _integrate
    from flowmatch.sampling import IntegrationError, Solver

    x0 = torch.randn(8, 2)
    with pytest.raises(IntegrationError, match="dopri5 could not integrate"):
        Solver("dopri5").integrate(lambda x, t: x * 1e30, x0)
    with pytest.raises(IntegrationError, match="euler4 sends 8 of 8 sources to NaN or inf"):
        _integrate(lambda x, t: x * float("inf"), Solver("euler", steps=4), x0, "cpu")


def test_diverged_but_finite_training_stops_in_evaluation_with_one_line(tmp_path):
    """lr 2e3: the loss stays finite for 20 steps, the field sends every source to inf."""
    proc = run_entry(
        "train.py",
        *FAST,
        "optimizer.lr=2e3",
        "scheduler=constant",
        "solver=euler",
        f"hydra.run.dir={tmp_path}",
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "the evaluation stopped" in line and "NaN or inf" in line and "last.ckpt is kept" in line
    assert (tmp_path / "checkpoints" / "last.ckpt").exists() and not (tmp_path / "metrics.json").exists()
