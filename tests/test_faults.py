"""Numerical faults and unusable checkpoints: a non-finite loss stops training with one line and keeps the last
finite checkpoint; a checkpoint that is truncated, not a checkpoint, not flowmatch's or of another architecture
stops train.py and evaluate.py with one line before any work."""

import re

import pytest
import torch
from helpers import run_entry

from flowmatch.finite import LossGuard, NonFiniteLoss

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
    from flowmatch.entry import preflight

    path = checkpoints[1] / name
    for entry in ("train", "evaluate"):
        with pytest.raises(SystemExit) as info:
            preflight(entry, [f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}"])
        assert info.value.code == 2
        (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert expected in line and str(path) in line
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_architecture(checkpoints, tmp_path, capsys):
    from flowmatch.entry import preflight

    good = checkpoints[0]
    preflight("train", [f"ckpt_path={good}", f"hydra.run.dir={tmp_path}"])  # the same architecture passes
    with pytest.raises(SystemExit):
        preflight("train", [f"ckpt_path={good}", "model.width=64", f"hydra.run.dir={tmp_path}"])
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert "another architecture" in line and "width=256" in line and "width=64" in line


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
