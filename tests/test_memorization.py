"""callbacks=memorization end to end: the alarm fires on a short sigma = 0 fixed-pairs run and stays silent on an
independent-coupling run of the same size; the CSV's statistics equal a direct computation (a per-sample loop,
hand-written Euler) on the same pairs; training is unchanged by the callback; config composition; bad input;
``python -m flowmatch.diagnose`` on the runs and on a directory that is not a run."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import ROOT, read_metrics, run_entry
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from flowmatch import memorization as mem
from flowmatch.callbacks.memorization import MemorizationCallback
from flowmatch.entry import build
from flowmatch.gradvar import bin_edges
from flowmatch.losses import per_sample_loss
from flowmatch.plots.memorization_run import read_memorization
from flowmatch.streams import generator

# Small and fast: 16 pairs in 16 dimensions are memorized within ~200 steps at lr 3e-3 (sigma = 0).
STEPS = 300
COMMON = [
    "debug=fast",
    f"trainer.max_steps={STEPS}",
    "scheduler=constant",
    "optimizer.lr=3e-3",
    "data.dim=16",
    "data.batch_size=64",
    "coupling.n_holdout=100",
]
CALLBACK = [
    "callbacks=memorization",
    "callbacks.memorization.every_n_steps=25",
    "callbacks.memorization.bins=5",
    "callbacks.memorization.probe_size=100",
    "callbacks.memorization.euler_steps=[1,7]",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fixed: 16 fixed pairs, sigma = 0, callback on; indep: independent coupling, callback on; plain: the same
    without the callback."""
    d = {k: tmp_path_factory.mktemp(k) for k in ("fixed", "indep", "plain")}
    args = {
        "fixed": ["coupling=fixed", "coupling.n_pairs=16", *CALLBACK],
        "indep": ["coupling=independent", *CALLBACK],
        "plain": ["coupling=independent"],
    }
    with ThreadPoolExecutor(2) as pool:
        jobs = {k: pool.submit(run_entry, "train.py", *COMMON, *args[k], f"hydra.run.dir={d[k]}") for k in d}
        out = {k: j.result().stdout for k, j in jobs.items()}
    return d, out


def test_alarm_fires_on_memorizing_run_and_not_on_independent(runs):
    d, out = runs
    lines = [ln for ln in out["fixed"].splitlines() if "memorization alarm" in ln]
    assert len(lines) == 1 and lines[0].startswith("flowmatch: WARNING: memorization alarm at step ")
    assert "grad_var gap" in lines[0] and "pair accuracy euler7" in lines[0]
    m = read_metrics(d["fixed"])
    step = m["mem/alarm_step"]
    assert 0 < step <= STEPS and f"at step {int(step)}:" in lines[0]
    rows = read_memorization(d["fixed"] / "memorization.csv")
    assert [r["step"] for r in rows] == list(range(0, STEPS + 1, 25))  # start, every 25 steps, end (not twice)
    assert [r["alarm"] for r in rows] == [int(r["step"] >= step) for r in rows]
    assert rows[-1]["pair_acc@euler7"] >= 0.9 and rows[-1]["holdout_pair_acc@euler7"] < 0.2
    mi = read_metrics(d["indep"])
    assert "mem/alarm_step" not in mi and mi["mem/probes"] == len(rows)
    assert "memorization alarm" not in out["indep"] and "no alarm" in out["indep"]
    assert max(abs(r["var_gap"]) for r in read_memorization(d["indep"] / "memorization.csv")) < 0.3
    for run in ("fixed", "indep"):
        assert 0 < read_metrics(d[run])["mem/time_share"] < 1
        assert (d[run] / "memorization.png").stat().st_size > 10_000
    logged = (d["fixed"] / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "mem/bin_02/var_ratio" in logged and "mem/pair_acc@euler7" in logged and "mem/signal" in logged


def _loop_stats(model, path, edges):
    """Per-bin loss and gradient variance by a plain loop: one backward per sample, float64 sums."""
    params = [p for p in model.parameters() if p.requires_grad]
    k = torch.bucketize(path.t.double(), edges, right=True) - 1
    out = []
    for b in range(len(edges) - 1):
        losses, grads = [], []
        for i in torch.nonzero(k == b).flatten().tolist():
            loss = per_sample_loss(model, path[i : i + 1])[0]
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double())
            losses.append(float(loss.detach()))
        g = torch.stack(grads)
        var = float(((g**2).sum() - len(g) * (g.mean(0) ** 2).sum()) / (len(g) - 1))
        out.append((sum(losses) / len(losses), var))
    return out


def _euler(model, x0, steps):
    x = x0.clone()
    with torch.no_grad():
        for j in range(steps):
            x = x + model(x, torch.full((len(x),), j / steps)) / steps
    return x


def test_statistics_equal_direct_computation(runs):
    d, _ = runs
    cfg = OmegaConf.load(d["fixed"] / ".hydra" / "config.yaml")
    dm, module, _ = build(cfg)
    ckpt = torch.load(d["fixed"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == STEPS
    dm.load_state_dict(ckpt["GaussianDataModule"])
    module.load_state_dict(ckpt["state_dict"])
    model = module.model.eval()
    edges = bin_edges(5)
    probe = mem.build_probe(dm.coupling, module.interpolant, edges, 100, generator(0, "memprobe"))
    X0, X1 = dm.coupling.pairs
    assert torch.equal(probe.train.t, probe.holdout.t) and torch.equal(probe.train.eps, probe.holdout.eps)
    assert torch.equal(probe.holdout.x0, dm.coupling.holdout[0][:100])
    assert bool((probe.train.x0[:, None] == X0[None]).all(-1).any(1).all())  # every probe pair is a training pair
    row = read_memorization(d["fixed"] / "memorization.csv")[-1]
    assert row["step"] == STEPS
    for name, path in (("train", probe.train), ("holdout", probe.holdout)):
        for b, (loss, var) in enumerate(_loop_stats(model, path, edges)):
            assert row[f"bin{b:02d}_loss_{name}"] == pytest.approx(loss, rel=1e-4), (name, b)
            assert row[f"bin{b:02d}_var_{name}"] == pytest.approx(var, rel=1e-4), (name, b)
    for k in (1, 7):  # pair accuracy: nearest among every training target / every held-out target
        near = torch.cdist(_euler(model, X0, k), X1).argmin(1)
        assert row[f"pair_acc@euler{k}"] == pytest.approx(float((near == torch.arange(16)).float().mean()))
        h0, h1 = probe.holdout.x0, probe.holdout.x1
        near = torch.cdist(_euler(model, h0, k), h1).argmin(1)
        assert row[f"holdout_pair_acc@euler{k}"] == pytest.approx(float((near == torch.arange(100)).float().mean()))


def test_callback_leaves_training_unchanged(runs):
    d, _ = runs
    a = torch.load(d["indep"] / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(d["plain"] / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_metrics(d["indep"]), read_metrics(d["plain"])
    drop = ("protocol/ckpt_path",)
    assert {k: v for k, v in ma.items() if not k.startswith("mem/") and k not in drop} == {
        k: v for k, v in mb.items() if k not in drop
    }


def test_composes_with_gradvar_and_images():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["callbacks=[gradvar,memorization]"])
        assert list(cfg.callbacks) == ["gradvar", "memorization"]
        assert [type(instantiate(c)).__name__ for c in cfg.callbacks.values()] == [
            "GradientVarianceCallback",
            "MemorizationCallback",
        ]
        cfg = compose("train", overrides=["experiment=digits_memorization", "callbacks=[images,memorization]"])
        assert list(cfg.callbacks) == ["ema", "samples", "memorization"]


def test_bad_settings():
    with pytest.raises(ValueError, match="callbacks.memorization.signal must be one of"):
        MemorizationCallback(signal="nope")
    with pytest.raises(ValueError, match="callbacks.memorization.patience"):
        MemorizationCallback(patience=0)
    with pytest.raises(ValueError, match="callbacks.memorization.threshold"):
        MemorizationCallback(threshold=float("nan"))
    with pytest.raises(ValueError, match="callbacks.memorization.signal_t"):
        MemorizationCallback(bins=2, signal_t=[0.1, 0.9])
    with pytest.raises(ValueError, match="callbacks.memorization.euler_steps"):
        MemorizationCallback(euler_steps=[])


def test_no_holdout_is_one_clear_error(tmp_path):
    proc = run_entry("train.py", "debug=fast", "coupling=fixed", "coupling.n_holdout=0", *CALLBACK[:1],
                     f"hydra.run.dir={tmp_path}", check=False)  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "coupling.n_holdout" in errors[0] and "callbacks.memorization" in errors[0]


def test_alarm_streak_and_nan():
    alarm = mem.Alarm(1.0, 2)
    assert [alarm.update(s, v) for s, v in enumerate([2.0, float("nan"), 1.5, 1.0, 3.0])] == [
        False,
        False,
        False,
        True,
        False,
    ]
    assert alarm.step == 3 and alarm.streak == 3


def test_csv_rows_survive_a_cut_and_refuse_other_columns(tmp_path):
    path = tmp_path / "memorization.csv"
    for step in (0, 10):
        MemorizationCallback._append(path, {"step": step, "signal": 0.5})
    with path.open("a") as fh:
        fh.write("20,")  # a row cut short by a crash
    assert [r["step"] for r in read_memorization(path)] == [0, 10]
    MemorizationCallback._append(path, {"step": 30, "signal": 0.5})  # a resumed run appends on a line of its own
    assert [r["step"] for r in read_memorization(path)] == [0, 10, 30]
    with pytest.raises(ValueError, match="other columns"):
        MemorizationCallback._append(path, {"step": 30, "other": 1.0})


def _diagnose(*dirs):
    return subprocess.run(
        [sys.executable, "-m", "flowmatch.diagnose", *map(str, dirs)], cwd=ROOT, capture_output=True, text=True
    )


def test_diagnose_run_dirs(runs):
    d, _ = runs
    proc = _diagnose(d["fixed"], d["indep"], d["plain"])
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"{d['fixed']}: memorizing" in text and "alarm raised at step" in text
    assert f"{d['indep']}: generalizing" in text
    assert f"{d['plain']}: unclear" in text and "cannot judge: no memorization.csv" in text
    for run in d.values():
        assert (Path(run) / "diagnosis.png").stat().st_size > 10_000


def test_diagnose_not_a_run(tmp_path):
    proc = _diagnose(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {str(tmp_path)!r} is not a run directory (none of .hydra/config.yaml, metrics.json, "
        "memorization.csv, gradvar.csv in it)"
    ]
