"""hydra/launcher options run real sweeps: joblib_cpu (2x2, four distinct run dirs), submitit_local (2 jobs), and
slurm, whose sbatch script for a 2-job sweep is rendered without submitting it (scripts/sbatch_preview.sh) and
checked against the site file conf/local/slurm.yaml, the command line and the trainer."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, read_metrics, run_entry
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from submitit.core.utils import DelayedSubmission

FAST = ["debug=fast", "interpolant=cfm"]


def _job_dirs(sweep) -> list:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def _site_copy(tmp_path):
    """train.py, conf/ and the preview script copied to tmp_path/repo, with the tracked example as the site file
    conf/local/slurm.yaml (a site file of this checkout, if any, is left out: the test sees only the example)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "conf", repo / "conf", ignore=shutil.ignore_patterns("local"))
    (repo / "conf" / "local").mkdir()
    shutil.copy(ROOT / "conf" / "local.example" / "slurm.yaml", repo / "conf" / "local" / "slurm.yaml")
    (repo / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "sbatch_preview.sh", repo / "scripts")
    shutil.copy(ROOT / "train.py", repo)
    return repo


def test_slurm_script_of_a_two_job_sweep(tmp_path):
    repo, sweep = _site_copy(tmp_path), tmp_path / "sweep"
    site = yaml.safe_load((repo / "conf" / "local" / "slurm.yaml").read_text())
    env = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [*FAST, "interpolant.sigma=0.0,0.05", "hydra.launcher.timeout_min=30", "++trainer.num_nodes=2"]
    proc = subprocess.run(
        ["bash", str(repo / "scripts" / "sbatch_preview.sh"), *args, f"hydra.sweep.dir={sweep}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = proc.stdout
    flags = {
        ln.split("=", 1)[0][len("#SBATCH --") :]: ln.split("=", 1)[1]
        for ln in script.splitlines()
        if "=" in ln and ln.startswith("#SBATCH")
    }
    assert flags["array"] == "0-1%2"  # one array job, two elements
    assert flags["partition"] == site["partition"] and flags["account"] == site["account"]  # the site file
    assert flags["time"] == "30"  # the command line beats the site file (240)
    assert flags["gpus-per-node"] == flags["ntasks-per-node"] == str(site["gpus_per_node"])  # a task per GPU
    assert flags["nodes"] == "2"  # follows trainer.num_nodes
    assert flags["cpus-per-task"] == str(site["cpus_per_task"]) and flags["mem"] == f"{site['mem_gb']}GB"
    setup = script.split("# setup\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert setup == site["setup"]
    assert script.index("# setup") < script.index("srun ")
    assert f"{sys.executable} -u -m submitit.core._submit {sweep}/.submitit/" in script
    jobs = [DelayedSubmission.load(p) for p in (sweep / ".submitit").glob("*.pkl")]  # what each element would run
    assert sorted(j.args[2] for j in jobs) == [0, 1]
    assert sorted(o for j in jobs for o in j.args[0] if o.startswith("interpolant.sigma")) == [
        "interpolant.sigma=0.0",
        "interpolant.sigma=0.05",
    ]


@pytest.mark.parametrize("primary", ["train", "evaluate"])
def test_default_dirs_of_two_launches_in_one_second_differ(primary):
    """The default run and sweep dirs carry microseconds; a sweep's job dirs start with the job number."""
    dirs = []
    for _ in range(2):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            hydra_cfg = compose(primary, return_hydra_config=True).hydra
            dirs.append((OmegaConf.select(hydra_cfg, "run.dir"), OmegaConf.select(hydra_cfg, "sweep.dir")))
            subdir = OmegaConf.to_container(hydra_cfg.sweep, resolve=False)["subdir"]
            assert subdir.startswith("${hydra.job.num}_")
    assert dirs[0][0] != dirs[1][0] and dirs[0][1] != dirs[1][1]
    assert dirs[0][0][:-7] == dirs[1][0][:-7] or dirs[0][0] < dirs[1][0]  # same second (almost always), later


@pytest.mark.slow
def test_joblib_2x2_sweep_writes_four_distinct_run_dirs(tmp_path):
    run_entry(
        "train.py",
        "-m",
        *FAST,
        "interpolant.sigma=0.0,0.05",
        "seed=0,1",
        "hydra/launcher=joblib_cpu",
        f"hydra.sweep.dir={tmp_path}",
        timeout=600,
    )
    jobs = _job_dirs(tmp_path)  # default subdir: <job num>_<overrides>
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        seen.add((cfg["interpolant"]["sigma"], cfg["seed"]))
        assert f"interpolant.sigma={cfg['interpolant']['sigma']}" in job.name and f"seed={cfg['seed']}" in job.name
        assert read_metrics(job)["train/global_step"] == 20.0
        assert (job / "checkpoints" / "last.ckpt").exists()
    assert seen == {(0.0, 0), (0.0, 1), (0.05, 0), (0.05, 1)}


@pytest.mark.slow
def test_submitit_local_two_job_sweep(tmp_path):
    run_entry(
        "train.py",
        "-m",
        *FAST,
        "interpolant.sigma=0.0,0.05",
        "hydra/launcher=submitit_local",
        "hydra.launcher.cpus_per_task=1",
        f"hydra.sweep.dir={tmp_path}",
        timeout=600,
    )
    jobs = _job_dirs(tmp_path)
    assert len(jobs) == 2
    for job, sigma in zip(jobs, (0.0, 0.05)):
        assert yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["interpolant"]["sigma"] == sigma
        assert read_metrics(job)["train/global_step"] == 20.0
    assert len(list((tmp_path / ".submitit").glob("*/*_result.pkl"))) == 2  # each job ran as its own submitit job
