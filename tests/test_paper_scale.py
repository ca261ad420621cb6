"""The paper-scale side of the paper targets: the paper-scale overlays compose and instantiate without data or a GPU,
``make figures-paper`` (scripts/paper_plan.py) prints a plan for items 1-12, the GPU check stops clearly without
CUDA, and the probe-cost timer (scripts/probe_cost.py) runs the callbacks' probes on a small config."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
PAPER_OVERLAYS = sorted(p.stem for p in (CONF / "experiment" / "paper").glob("*_paper.yaml"))


def _plan_module():
    """scripts/paper_plan.py as a module (registered in sys.modules: it defines dataclasses)."""
    if "paper_plan" not in sys.modules:
        spec = importlib.util.spec_from_file_location("paper_plan", ROOT / "scripts" / "paper_plan.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["paper_plan"] = module
        spec.loader.exec_module(module)
    return sys.modules["paper_plan"]


def _compose(overlay: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"experiment=paper/{overlay}", *overrides])


def test_there_are_paper_scale_overlays():
    assert "fig-gradvar_paper" in PAPER_OVERLAYS


@pytest.mark.parametrize("overlay", PAPER_OVERLAYS)
def test_paper_overlay_instantiates_without_data(overlay, tmp_path):
    """Data module, model, module, callbacks and trainer (CPU here when the overlay asks for a GPU); image data
    sets are instantiated but never set up (their files are loaded in setup())."""
    from flowmatch.data import FlowDataModule
    from flowmatch.module import FlowMatchingModule

    cfg = _compose(overlay)
    if OmegaConf.is_missing(cfg.coupling, "pairs_path"):  # coupling=reflow: the pairs file is read only in setup()
        cfg.coupling.pairs_path = str(tmp_path / "reflow_pairs.pt")
    dm = instantiate(cfg.data, coupling=instantiate(cfg.coupling))
    assert isinstance(dm, FlowDataModule) and dm.p0 is None
    model = instantiate(cfg.model)
    module = FlowMatchingModule(
        model, instantiate(cfg.interpolant), instantiate(cfg.optimizer), instantiate(cfg.scheduler)
    )
    assert module.configure_optimizers()
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer_cfg = dict(cfg.trainer)
    if not torch.cuda.is_available():
        trainer_cfg.update(accelerator="cpu", devices=1, precision="32-true")
    trainer = instantiate(trainer_cfg, logger=False, callbacks=callbacks, default_root_dir=str(tmp_path))
    assert trainer.max_steps == cfg.trainer.max_steps
    instantiate(cfg.solver), instantiate(cfg.eval)


def test_fig_gradvar_paper_is_cifar10_unet_cifar_bf16_ema():
    cfg = _compose("fig-gradvar_paper")
    assert cfg.data._target_.endswith("CIFAR10DataModule") and cfg.data.image_size == 32 and cfg.data.dim == 3072
    model = instantiate(cfg.model)
    assert 35.0e6 < sum(p.numel() for p in model.parameters()) < 36.5e6  # the torchcfm CIFAR-10 UNet
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.callbacks.ema.decay == 0.9999
    assert cfg.callbacks.gradvar.source == "interpolant" and cfg.callbacks.gradvar_integrated.source == "integrated"
    assert cfg.trainer.max_steps >= 50_000
    assert {"direction=forward,backward", "interpolant.sigma=0.0,0.05"} <= set(
        _plan_module().header_value(CONF / "experiment" / "paper" / "fig-gradvar_paper.yaml", "sweep").split()
    )


def test_jobs_of_counts_the_sweep():
    plan = _plan_module()
    assert plan.jobs_of("direction=forward,backward interpolant.sigma=0.0,0.05 seed=0,1,2") == 12
    assert plan.jobs_of("a=[1,2] b=x") == 1
    assert plan.jobs_of("") == 1


def test_flop_count_of_a_convolution_matches_the_formula():
    """FlopCounterMode counts 2 per multiply-add: a 3x3 conv C_in -> C_out on H x W costs 2 C_in C_out 9 H W forward,
    and as much again for the weight gradient (no input gradient at the first layer)."""

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)

        def forward(self, x, t):
            return self.conv(x)

    f_f, f_fb = _plan_module().flops_per_sample(Conv(), (4, 6, 6))
    assert f_f == 2 * 4 * 8 * 9 * 6 * 6
    assert f_fb == 2 * f_f


def test_figures_paper_prints_every_item():
    proc = subprocess.run(
        [sys.executable, "scripts/paper_plan.py"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for n, item in enumerate(
        "lemma1 prop1 fig4 fig5 fig6 prop2 table1 table2 table3 fig-gradvar fig-stability lemma2".split(), start=1
    ):
        assert f"[{n:>2}] {item}:" in out, item
    for item in ("lemma1", "fig-stability", "table1"):
        assert f"] {item}: CPU only, no GPU needed" in out
    gradvar = out.split("] fig-gradvar:")[1].split("\n[")[0]
    assert "experiment=paper/fig-gradvar_paper" in gradvar and "jobs: 12" in gradvar
    hours = [float(line.split("GPU-h per job")[0].split(":")[-1]) for line in gradvar.splitlines() if "GPU-h" in line]
    assert len(hours) == 3 and all(h > 0 and math.isfinite(h) for h in hours)  # A100, H100 estimates; H200 measured
    assert "MEASURED on an H200" in gradvar
    assert "ESTIMATE" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_paper_scale_check_stops_clearly_without_cuda():
    proc = subprocess.run(
        ["bash", "scripts/paper_scale_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3
    assert "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_probe_cost_times_both_probes_on_a_small_config(tmp_path):
    out = tmp_path / "probe_cost.json"
    overrides = [
        "experiment=paper/fig-gradvar",
        "callbacks.gradvar.probe_size=20",
        "callbacks.gradvar_integrated.probe_size=20",
        "callbacks.gradvar_integrated.ode_steps=2",
        "data.batch_size=8",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/probe_cost.py",
            str(out),
            *overrides,
            "--warmup",
            "1",
            "--steps",
            "2",
            "--repeats",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["step_s"] > 0 and set(result["probes"]) == {"gradvar", "gradvar_integrated"}
    for p in result["probes"].values():
        assert p["probe_s"] > 0 and p["probe_in_training_steps"] == pytest.approx(p["probe_s"] / result["step_s"])
    assert result["probes"]["gradvar_integrated"]["source"] == "integrated"
