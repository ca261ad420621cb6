"""The terminal: quiet by default (no Lightning banners or tips, no deprecation warnings), progress of training
and of the final evaluation, the run's log file holds what the terminal showed, and sweep lines carry their job
(flowmatch/terminal.py, flowmatch/callbacks/progress.py)."""

import re

import pytest
from helpers import run_entry

from flowmatch.callbacks.progress import ProgressLines, _clock

NOISE = ("GPU available", "TPU available", "Tip:", "LeafSpec", "deprecated", "Trainer.fit` stopped", "litlogger")
FAST = ["debug=fast", "eval.n_fresh=200", "eval.euler_steps=[1,7]"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    return d, run_entry("train.py", *FAST, "progress.every_s=0.001", f"hydra.run.dir={d}")


def test_a_run_is_quiet_and_shows_progress(single):
    _, proc = single
    out = proc.stdout + proc.stderr
    assert not [n for n in NOISE if n in out], out[-3000:]
    assert proc.stderr.strip() == ""  # no warnings at all on this run
    lines = proc.stdout.splitlines()
    steps = [int(m.group(1)) for ln in lines if (m := re.match(r"step (\d+)/20 \(\d+%\) · loss \S+ · ", ln))]
    assert steps and steps == sorted(steps) and steps[-1] <= 20
    assert any(re.match(r"trained 20 steps in 0:\d\d \(\d+\.\d steps/s\) · loss ", ln) for ln in lines)
    # the final evaluation says which solver runs, then how long it took
    evals = [ln for ln in lines if ln.startswith("evaluate: ")]
    assert evals[0] == "evaluate: 200 fresh samples with dopri5"
    assert any("with euler7" in ln for ln in evals) and re.match(r"evaluate: done in \d+\.\d s", evals[-1])


def test_the_log_file_holds_what_the_terminal_showed(single):
    run_dir, proc = single
    logged = [ln.split("] ", 1)[1] for ln in (run_dir / "train.log").read_text().splitlines() if "] " in ln]
    shown = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert shown and all(ln in logged for ln in shown), set(shown) - set(logged)


def test_verbose_brings_lightnings_messages_back(tmp_path):
    proc = run_entry("train.py", *FAST, "eval.enabled=false", "verbose=true", f"hydra.run.dir={tmp_path}")
    assert "GPU available" in proc.stdout + proc.stderr
    assert "GPU available" in (tmp_path / "train.log").read_text()


def test_progress_none_keeps_the_lines_in_the_log_file_only(tmp_path):
    proc = run_entry("train.py", *FAST, "eval.enabled=false", "progress.mode=none", f"hydra.run.dir={tmp_path}")
    assert not any(ln.startswith(("step ", "trained ")) for ln in proc.stdout.splitlines())
    assert "trained 20 steps" in (tmp_path / "train.log").read_text()


def test_sweep_lines_name_their_job(tmp_path):
    proc = run_entry("train.py", "-m", *FAST, "eval.enabled=false", "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    for k, seed in ((1, 0), (2, 1)):
        mine = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"[job {k}/2 seed={seed}] ")]
        assert any("trained 20 steps" in ln for ln in mine) and any("parameters; run dir" in ln for ln in mine)


def test_progress_lines_unit():
    with pytest.raises(ValueError, match="progress.mode='bars' is not one of"):
        ProgressLines(mode="bars")
    with pytest.raises(ValueError, match="progress.every_s=0"):
        ProgressLines(every_s=0)
    assert ProgressLines().resolve(interactive=True) == "bar" and ProgressLines().resolve(interactive=False) == "lines"
    assert ProgressLines(mode="none").resolve(interactive=True) == "none"
    assert [_clock(s) for s in (5, 65, 3605)] == ["0:05", "1:05", "1:00:05"]
