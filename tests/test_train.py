"""End to end: train.py / evaluate.py write the run-directory contract of DESIGN.md."""

import json

import pytest
import torch
import yaml
from helpers import read_metrics, run_entry

FAST = ["debug=fast", "trainer.max_steps=20"]


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fixed")
    run_entry("train.py", *FAST, "coupling=fixed", "coupling.n_pairs=16", "interpolant=cfm", f"hydra.run.dir={d}")
    return d


def test_run_dir_contract(fixed_run):
    assert (fixed_run / ".hydra" / "config.yaml").exists()
    assert (fixed_run / "checkpoints" / "last.ckpt").exists()
    assert (fixed_run / "csv" / "metrics.csv").exists()
    m = read_metrics(fixed_run)
    assert all("/" in k for k in m)
    assert all(isinstance(v, float) for k, v in m.items() if not k.startswith("protocol/"))
    assert all(isinstance(v, (float, str)) for v in m.values())
    for key in [
        "train/loss",
        "eval/pair_acc",
        "eval/l2_partner",
        "eval/l2_ot",
        "eval/mmd_mem",
        "eval/mmd_gen",
        "eval/w2",
        "eval/nfe",
        "eval/pair_acc@euler7",
        "eval/l2_ot@euler1",
    ]:
        assert key in m, key
    assert m["train/global_step"] == 20.0
    cfg = yaml.safe_load((fixed_run / ".hydra" / "config.yaml").read_text())
    assert cfg["coupling"]["n_pairs"] == 16 and cfg["interpolant"]["sigma"] == 0.05


def test_resume_continues_steps_and_keeps_pairs(fixed_run, tmp_path):
    ck = fixed_run / "checkpoints" / "last.ckpt"
    run_entry(
        "train.py",
        *FAST,
        "coupling=fixed",
        "coupling.n_pairs=16",
        "interpolant=cfm",
        "trainer.max_steps=30",
        "seed=7",
        f"ckpt_path={ck}",
        f"hydra.run.dir={tmp_path}",
    )
    assert read_metrics(tmp_path)["train/global_step"] == 30.0
    a = torch.load(ck, weights_only=False)["GaussianDataModule"]["coupling"]
    b = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["GaussianDataModule"]["coupling"]
    torch.testing.assert_close(a["x0"], b["x0"])  # seed=7 would draw other pairs: they came from the checkpoint
    assert len(a["holdout_x0"]) == 256  # coupling.n_holdout: held-out pairs are saved with the pairs ...
    torch.testing.assert_close(a["holdout_x0"], b["holdout_x0"])  # ... and survive the resume like them
    torch.testing.assert_close(a["holdout_x1"], b["holdout_x1"])


def test_resume_last_in_same_dir(tmp_path):
    run_entry("train.py", *FAST, f"hydra.run.dir={tmp_path}")
    run_entry("train.py", *FAST, "trainer.max_steps=25", "ckpt_path=last", f"hydra.run.dir={tmp_path}")
    assert read_metrics(tmp_path)["train/global_step"] == 25.0


def test_evaluate_with_other_solver(fixed_run, tmp_path):
    run_entry(
        "evaluate.py",
        f"ckpt_path={fixed_run}/checkpoints/last.ckpt",
        "solver=euler",
        "solver.steps=7",
        "eval.euler_steps=[7]",
        "eval.n_fresh=64",
        f"hydra.run.dir={tmp_path}",
    )
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["protocol/solver"] == "euler7" and m["eval/nfe"] == 7.0
    assert m["eval/pair_acc"] == pytest.approx(m["eval/pair_acc@euler7"])


def test_train_and_evaluate_write_the_same_metrics(fixed_run, tmp_path):
    """One evaluation path: evaluate.py on the final checkpoint with the run's own options reproduces the
    end-of-training eval/ and protocol/ keys and values (train.py adds only train/ and val/ keys)."""
    run_entry(
        "evaluate.py",
        f"ckpt_path={fixed_run}/checkpoints/last.ckpt",
        "eval.euler_steps=[1,7]",
        "eval.n_fresh=128",
        f"hydra.run.dir={tmp_path}",
    )  # the options of debug=fast
    trained, evaluated = read_metrics(fixed_run), read_metrics(tmp_path)
    shared = {k: v for k, v in trained.items() if k.split("/")[0] in ("eval", "protocol")}
    assert set(shared) == set(evaluated)
    for k, v in shared.items():
        if k == "protocol/ckpt_path":
            assert v.endswith("last.ckpt") and evaluated[k].endswith("last.ckpt")
        elif isinstance(v, float):
            assert evaluated[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
        else:
            assert evaluated[k] == v, k


def test_backward_direction_and_reflow(tmp_path):
    run_entry("train.py", *FAST, "direction=backward", "coupling=ot", f"hydra.run.dir={tmp_path / 'a'}")
    m = read_metrics(tmp_path / "a")
    assert "eval/l2_ot" in m  # closed-form OT map N(5, I) -> N(0, I) exists
    run_entry(
        "evaluate.py",
        f"ckpt_path={tmp_path / 'a'}/checkpoints/last.ckpt",
        "task=reflow_pairs",
        "reflow.n_pairs=32",
        "solver=euler",
        "solver.steps=4",
        f"hydra.run.dir={tmp_path / 'b'}",
    )
    pairs = torch.load(tmp_path / "b" / "reflow_pairs.pt")
    assert pairs["x0"].shape == pairs["x1"].shape == (32, 2)
    run_entry(
        "train.py",
        *FAST,
        "direction=backward",
        "coupling=reflow",
        f"coupling.pairs_path={tmp_path / 'b' / 'reflow_pairs.pt'}",
        f"hydra.run.dir={tmp_path / 'c'}",
    )
    assert "eval/pair_acc" in read_metrics(tmp_path / "c")


@pytest.mark.parametrize(
    "override,expected",
    [
        ("interpolant=foo", ["interpolant", "bridge", "cfm", "linear"]),
        ("hydra/launcher=slrum", ["hydra/launcher", "slrum", "slurm", "joblib_cpu", "submitit_local"]),
        ("hydra/launcher=slurm hydra.launcher.partiton=gpu", ["hydra.launcher.partiton", "partition", "setup"]),
        ("interpolant.sigmaa=0.1", ["interpolant.sigmaa", "sigma"]),
        ("interpolant=cfm interpolant.sigma=-0.5", ["interpolant.sigma", ">= 0"]),
        ("data.dim=0", ["data.dim", ">= 1"]),
        ("solver=euler solver.steps=0", ["solver.steps", ">= 1"]),
        ("direction.name=sideways", ["direction.name", "forward", "backward"]),
    ],
)
def test_bad_input_one_clear_error(override, expected, tmp_path):
    proc = run_entry("train.py", *override.split(), f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for word in expected:
        assert word in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()  # stopped before training


def test_wandb_offline_logger(tmp_path):
    run_entry(
        "train.py",
        *FAST,
        "logger=wandb",
        f"hydra.run.dir={tmp_path}",
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)},
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and "eval/w2" in read_metrics(tmp_path)


def test_gmm_bridge_ot_rk4(tmp_path):
    run_entry(
        "train.py",
        *FAST,
        "data=gmm",
        "interpolant=bridge",
        "interpolant.sigma=0.1",
        "coupling=ot",
        "solver=rk4",
        "solver.steps=5",
        f"hydra.run.dir={tmp_path}",
    )
    m = read_metrics(tmp_path)
    assert m["eval/nfe"] == 20.0  # rk4: 4 evaluations per step
    assert "eval/l2_ot" not in m and m["eval/w2"] > 0  # no closed-form OT map for a mixture
