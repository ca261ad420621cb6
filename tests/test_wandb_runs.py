"""logger=wandb, offline: one wandb run per job of a sweep (own id, the sweep's group, the overrides as name), the
gradient variance as per-bin series plus the heatmap image, metrics.json in the summary, the id kept in the run
dir so a resumed job continues its run, and wandb.finish on an error too (flowmatch/wandb_run.py)."""

import json

import pytest
from helpers import read_metrics, run_entry
from wandb_offline import offline_runs, summarize

from flowmatch.keys import gradvar_key, media_key, metric
from flowmatch.wandb_run import ID_FILE, sweep_group

FAST = ["debug=fast", "logger=wandb", "interpolant=cfm"]
PROBE = ["callbacks=gradvar", "callbacks.gradvar.every_n_steps=10", "callbacks.gradvar.probe_size=40"]


def _env(tmp_path) -> dict:
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_home")}


def _job_dirs(sweep) -> list:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
def test_sweep_one_run_per_job_then_resume_keeps_the_id(tmp_path):
    sweep = tmp_path / "sweeps" / "gv"
    run_entry(
        "train.py",
        "-m",
        *FAST,
        *PROBE,
        "interpolant.sigma=0.0,0.05",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
        env=_env(tmp_path),
    )
    jobs = _job_dirs(sweep)
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    runs = []
    for job, sigma in zip(jobs, ("0.0", "0.05")):
        (folder,) = offline_runs(job)  # one wandb run per job, even though both jobs ran in one process
        run = summarize(folder)
        assert run["id"] == (job / ID_FILE).read_text().strip() and folder.name.endswith(run["id"])
        assert run["group"] == sweep_group(sweep) == "sweeps/gv"
        assert f"interpolant.sigma={sigma}" in run["name"].split(",")
        assert run["exit_code"] == 0
        assert {gradvar_key(0, "var"), gradvar_key(9, "var"), gradvar_key(3, "loss")} <= run["history_keys"]
        assert list((folder / "files" / "media" / "images").glob(media_key("gradvar/heatmap") + "_*.png"))
        m = read_metrics(job)  # every metrics.json value is in the summary, numbers and protocol/ strings alike
        assert json.loads(run["summary"][metric("eval/w2")]) == pytest.approx(m["eval/w2"])
        assert json.loads(run["summary"][metric("protocol/solver")]) == m["protocol/solver"]
        runs.append(run)
    assert runs[0]["id"] != runs[1]["id"]

    # the same sweep command again, for sigma = 0 only, with ckpt_path=last and more steps: the job lands in the
    # same run dir (ckpt_path and trainer.max_steps are not in the dir name), resumes, and continues its wandb run
    run_entry(
        "train.py",
        "-m",
        *FAST,
        *PROBE,
        "interpolant.sigma=0.0",
        "trainer.max_steps=30",
        "ckpt_path=last",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
        env=_env(tmp_path),
    )
    assert _job_dirs(sweep) == jobs
    assert read_metrics(jobs[0])[metric("train/global_step")] == 30.0
    first, resumed = offline_runs(jobs[0])
    resumed = summarize(resumed)
    assert resumed["id"] == runs[0]["id"] == (jobs[0] / ID_FILE).read_text().strip()
    assert resumed["group"] == runs[0]["group"] and resumed["exit_code"] == 0


@pytest.mark.slow
def test_failed_job_finishes_its_run_and_the_next_job_gets_its_own(tmp_path):
    """Job 0 fails inside training (after its wandb run started): its run ends with exit code 1, the process exits
    non-zero, and job 1, run next in the same process, still gets a run of its own."""
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "memorization.csv").write_text("not,the,columns\n")  # the callback refuses to append to it
    proc = run_entry(
        "train.py",
        "-m",
        *FAST,
        "callbacks=memorization",
        "callbacks.memorization.every_n_steps=10",
        "callbacks.memorization.probe_size=40",
        "callbacks.memorization.euler_steps=[1]",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",
        check=False,
        timeout=600,
        env=_env(tmp_path),
    )
    assert proc.returncode != 0
    (failed,) = offline_runs(sweep / "0")
    (done,) = offline_runs(sweep / "1")
    failed, done = summarize(failed), summarize(done)
    assert failed["exit_code"] == 1 and done["exit_code"] == 0
    assert failed["id"] != done["id"]
    assert not (sweep / "0" / "metrics.json").exists() and (sweep / "1" / "metrics.json").exists()
