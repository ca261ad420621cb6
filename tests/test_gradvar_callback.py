"""The GradientVarianceCallback end to end: gradvar.csv contract, logging, figures, DDP union property."""

import csv
import functools
import json

import pytest
import torch
from helpers import run_entry

from flowmatch import gradvar as gv
from flowmatch.callbacks.gradvar import GradientVarianceCallback
from flowmatch.couplings import FixedCoupling
from flowmatch.data import GaussianDataModule
from flowmatch.interpolants import CFM
from flowmatch.models.mlp import MLP
from flowmatch.module import FlowMatchingModule

COLUMNS = ["step", "t_lo", "t_hi", "n", "loss", "grad_var", "grad_sqnorm", "mean_grad_sqnorm"]


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def union_stats(run_dir, world_size: int, step: int, sigma: float = 0.0):
    """Recompute the probe statistics of ``step`` in one process on the union of the ranks' probes."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == step
    dm = GaussianDataModule(FixedCoupling(n_pairs=50, seed=0), dim=2)
    dm.load_state_dict(ckpt["GaussianDataModule"])
    dm.setup()
    module = FlowMatchingModule(MLP(2), CFM(sigma), functools.partial(torch.optim.Adam))
    module.load_state_dict(ckpt["state_dict"])
    cb = GradientVarianceCallback(bins=10, probe_size=400, seed=0, plot=False)
    total = None
    for rank in range(world_size):
        cb.fixed = cb.draw_fixed(dm.coupling, module.interpolant, rank)
        sums = gv.bin_sums(module.model, cb.probe(module), cb.edges, method="loop")
        total = sums if total is None else total + sums
    return total.to_stats()


def _compare(rows, stats, step):
    last = [r for r in rows if int(r["step"]) == step]
    assert len(last) == 10
    for k, r in enumerate(last):
        assert int(r["n"]) == int(stats.n[k])
        for col in ("loss", "grad_var", "grad_sqnorm", "mean_grad_sqnorm"):
            assert float(r[col]) == pytest.approx(float(getattr(stats, col)[k]), rel=1e-4), (k, col)


COMMON = [
    "debug=fast",
    "trainer.max_steps=20",
    "coupling=fixed",
    "callbacks=gradvar",
    "callbacks.gradvar.every_n_steps=10",
    "callbacks.gradvar.probe_size=400",
]


def test_callback_writes_contract_and_matches_recomputation(tmp_path):
    run_entry("train.py", *COMMON, f"hydra.run.dir={tmp_path}")
    rows = read_rows(tmp_path / "gradvar.csv")
    assert list(rows[0]) == COLUMNS
    assert sorted({int(r["step"]) for r in rows}) == [0, 10, 20]  # start, every 10 steps, end (not twice)
    assert (tmp_path / "gradvar_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "gradvar_profile.png").stat().st_size > 1000
    logged = read_rows(tmp_path / "csv" / "metrics.csv")
    assert any(r.get("gradvar/bin_03/var") for r in logged) and "gradvar/bin_09/loss" in logged[0]
    _compare(rows, union_stats(tmp_path, 1, 20), 20)
    engine = json.loads((tmp_path / "gradvar_engine.json").read_text())  # one process: norms of the sums only
    assert engine["engine"] == "hooks" and engine["chunk_size_setting"] == "auto" and engine["keep_sums"] is False
    assert 1 <= engine["chunk_size"] <= 400 and engine["memory_budget_mib"] == 2048 and engine["step"] == 0
    assert engine["n_chunks"] >= 1 and engine["bytes_per_sample"] > 0 and engine["probe_size"] == 400


def test_bad_callback_settings():
    with pytest.raises(ValueError, match="callbacks.gradvar.source"):
        GradientVarianceCallback(source="nope")
    with pytest.raises(ValueError, match="callbacks.gradvar.bins"):
        GradientVarianceCallback(bins=[0.5, 0.2])
    with pytest.raises(ValueError, match="callbacks.gradvar.probe_size"):
        GradientVarianceCallback(bins=10, probe_size=5)


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": "big"}, "chunk_size"),
        ({"memory_budget_mib": 0}, "memory_budget_mib"),
        ({"memory_budget_mib": "1G"}, "memory_budget_mib"),
        ({"method": "fast"}, "method"),
    ],
)
def test_bad_engine_settings_name_key_and_allowed_values(kw, key):
    with pytest.raises(ValueError, match=f"callbacks.gradvar.{key}") as err:
        GradientVarianceCallback(**kw)
    assert repr(next(iter(kw.values()))) in str(err.value)


def test_integrated_and_pairs_sources(tmp_path):
    run_entry(
        "train.py",
        *COMMON,
        "callbacks.gradvar.source=integrated",
        "callbacks.gradvar.ode_steps=20",
        "callbacks.gradvar.plot=false",
        "callbacks.gradvar.groups=module",
        f"hydra.run.dir={tmp_path / 'a'}",
    )
    rows = read_rows(tmp_path / "a" / "gradvar.csv")
    assert len(rows) == 30
    groups = read_rows(tmp_path / "a" / "gradvar_groups.csv")
    assert {r["group"] for r in groups} == {"net"} and len(groups) == 30  # the MLP's one parameterised child
    for whole, part in zip(rows, groups):  # a single group holding every parameter is the whole
        assert float(part["grad_var"]) == pytest.approx(float(whole["grad_var"]), rel=1e-6)
    proc = run_entry(
        "train.py",
        *COMMON,
        "coupling=independent",
        "callbacks.gradvar.source=pairs",
        f"hydra.run.dir={tmp_path / 'b'}",
        check=False,
    )
    assert proc.returncode == 2 and "callbacks.gradvar.source=pairs needs a finite coupling" in proc.stderr


def test_two_probes_in_one_run_write_two_csvs_and_log_one(tmp_path):
    """callbacks=[gradvar,gradvar_integrated]: gradvar.csv (interpolant) and gradvar_integrated.csv (integrated) on the
    same sources and times; only the first probe's numbers reach the loggers; the integrated table matches a
    recomputation of the integrated probe from the final checkpoint."""
    run_entry(
        "train.py",
        *[o for o in COMMON if not o.startswith("callbacks=")],
        "callbacks=[gradvar,gradvar_integrated]",
        "callbacks.gradvar_integrated.every_n_steps=10",
        "callbacks.gradvar_integrated.ode_steps=20",
        f"hydra.run.dir={tmp_path}",
    )
    interp, integ = read_rows(tmp_path / "gradvar.csv"), read_rows(tmp_path / "gradvar_integrated.csv")
    assert json.loads((tmp_path / "gradvar_integrated_engine.json").read_text())["engine"] == "hooks"
    assert len(interp) == len(integ) == 30
    assert [(r["step"], r["t_lo"], r["n"]) for r in interp] == [(r["step"], r["t_lo"], r["n"]) for r in integ]
    logged = [r for r in read_rows(tmp_path / "csv" / "metrics.csv") if r.get("gradvar/bin_00/var")]
    assert len(logged) == 3
    for r in logged:
        first = next(q for q in interp if q["step"] == r["step"] and float(q["t_lo"]) == 0.0)
        assert float(r["gradvar/bin_00/var"]) == pytest.approx(float(first["grad_var"]), rel=1e-6)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    dm = GaussianDataModule(FixedCoupling(n_pairs=50, seed=0), dim=2)
    dm.load_state_dict(ckpt["GaussianDataModule"])
    dm.setup()
    module = FlowMatchingModule(MLP(2), CFM(0.0), functools.partial(torch.optim.Adam))
    module.load_state_dict(ckpt["state_dict"])
    cb = GradientVarianceCallback(bins=10, probe_size=400, seed=0, source="integrated", ode_steps=20, plot=False)
    cb.fixed = cb.draw_fixed(dm.coupling, module.interpolant)
    _compare(integ, gv.bin_sums(module.model, cb.probe(module), cb.edges, method="loop").to_stats(), 20)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_union(tmp_path):
    run_entry(
        "train.py", *COMMON, "trainer=ddp_cpu", "callbacks.gradvar.plot=false", f"hydra.run.dir={tmp_path}", timeout=600
    )
    rows = read_rows(tmp_path / "gradvar.csv")
    assert int(rows[0]["n"]) == 80  # 2 ranks x 40 per bin
    assert json.loads((tmp_path / "gradvar_engine.json").read_text())["keep_sums"] is True  # sums to all-reduce
    _compare(rows, union_stats(tmp_path, 2, 20), 20)
