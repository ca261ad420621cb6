"""The paper-scale overlays of Table 2 and Table 3 (conf/experiment/paper/table{2,3}_paper.yaml) compose, resolve
and instantiate without data (CelebA is instantiated, never set up), with the settings they promise; every
stage of the table3 pipeline composes. tests/test_configs.py also reaches these files (one composition each)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from test_configs import composed, instantiate_run

from flowmatch.couplings import ShuffledOTCoupling


@pytest.mark.parametrize("subset,method", [(5000, "exact"), (50000, "auction")])
@pytest.mark.parametrize("sigma", [0.0, 0.05])
def test_table2_paper_composes_and_instantiates(subset, method, sigma, tmp_path):
    overrides = ["experiment=paper/table2_paper", f"data.subset={subset}", f"interpolant.sigma={sigma}"]
    with composed("train", overrides, tmp_path) as (cfg, _):
        assert cfg.data._target_.endswith("CelebADataModule") and cfg.data.image_size == 64 and not cfg.data.hflip
        assert cfg.model.base_channels == 128 and cfg.trainer.precision == "bf16-mixed"
        assert cfg.callbacks.ema.decay == 0.9999 and cfg.trainer.max_steps == 100_000
        coupling = instantiate(cfg.coupling)
        assert isinstance(coupling, ShuffledOTCoupling) and coupling.n_pairs == subset and coupling.distinct_targets
        # the solver the coupling will use for this many points: exact scipy at 5K, the auction at 50K
        solver = coupling.ot_solver
        assert ("exact" if subset <= solver.exact_max_n else "auction") == method
        instantiate_run(cfg, tmp_path)  # datamodule (no setup), module, solver, eval, callbacks, trainer


def test_table2_paper_model_runs_on_a_64px_batch(tmp_path):
    with composed("train", ["experiment=paper/table2_paper"], tmp_path) as (cfg, _):
        model = instantiate(cfg.model)
        with torch.no_grad():
            v = model(torch.randn(1, 3, 64, 64), torch.rand(1))
        assert v.shape == (1, 3, 64, 64) and torch.isfinite(v).all()


@pytest.mark.parametrize(
    "stage",
    [
        ["coupling=independent"],  # stage 1: the first flow
        ["coupling.pairs_path=PAIRS", "interpolant.sigma=0.05"],  # stage 3: ReFlow on the generated pairs
    ],
)
def test_table3_paper_stages_compose_and_instantiate(stage, tmp_path):
    pairs = tmp_path / "reflow_pairs.pt"
    torch.save({"x0": torch.randn(4, 3, 64, 64), "x1": torch.randn(4, 3, 64, 64)}, pairs)
    overrides = ["experiment=paper/table3_paper"] + [s.replace("PAIRS", str(pairs)) for s in stage]
    with composed("train", overrides, tmp_path) as (cfg, _):
        assert cfg.data.subset is None and cfg.trainer.precision == "bf16-mixed"
        instantiate_run(cfg, tmp_path)


def test_table3_pairs_stage_composes_for_evaluate(tmp_path):
    overrides = ["experiment=paper/table3_pairs", "reflow.n_pairs=5000", "reflow.batch_size=500", "ckpt_path=x.ckpt"]
    with composed("evaluate", overrides, tmp_path) as (cfg, _):
        assert cfg.task == "reflow_pairs" and cfg.reflow.n_pairs == 5000
