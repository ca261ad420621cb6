"""The eval_steps callback: the evaluation at a training step equals the end-of-training evaluation of a run
stopped there, and evaluating during training changes nothing in the training itself."""

import functools
import json
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from helpers import read_metrics, run_entry

import flowmatch.callbacks.eval_steps as eval_steps_module
from flowmatch.callbacks.eval_steps import EvalAtSteps
from flowmatch.couplings import FixedCoupling
from flowmatch.data import GaussianDataModule
from flowmatch.evaluation import EvalOptions
from flowmatch.interpolants import CFM
from flowmatch.models.mlp import MLP
from flowmatch.module import FlowMatchingModule
from flowmatch.sampling import Solver

S = 10  # the evaluated step; run B trains to 2 S
# Constant learning rate: the first S steps of a 2S-step run are those of an S-step run (cosine would differ).
COMMON = ["debug=fast", "scheduler=constant", "coupling=fixed", "coupling.n_pairs=16", "interpolant=cfm"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: S steps (end-of-training metrics.json); B: 2S steps with the callback at S; C: 2S steps without it."""
    d = {name: tmp_path_factory.mktemp(name) for name in "ABC"}
    args = {
        "A": [f"trainer.max_steps={S}"],
        "B": [f"trainer.max_steps={2 * S}", "callbacks=eval_steps", f"callbacks.eval_steps.steps=[{S}]"],
        "C": [f"trainer.max_steps={2 * S}"],
    }
    with ThreadPoolExecutor(3) as pool:  # three independent processes
        jobs = [pool.submit(run_entry, "train.py", *COMMON, *args[k], f"hydra.run.dir={d[k]}") for k in "ABC"]
        procs = [j.result() for j in jobs]
    return d, procs[1].stdout


def test_eval_at_step_equals_end_of_training_eval(runs):
    d, stdout = runs
    path = d["B"] / "eval_steps" / f"step={S:07d}.json"
    assert path.exists() and f"eval at step {S}" in stdout
    at_step, end_a = json.loads(path.read_text()), read_metrics(d["A"])
    evals = sorted(k for k in end_a if k.startswith("eval/"))
    assert evals and sorted(k for k in at_step if k.startswith("eval/")) == evals
    for k in evals:
        assert at_step[k] == pytest.approx(end_a[k], rel=1e-5, abs=1e-7), k
    for k, v in end_a.items():  # the same protocol, except the checkpoint (the weights were in memory)
        if k.startswith("protocol/") and k != "protocol/ckpt_path":
            assert at_step[k] == v, k
    assert "protocol/ckpt_path" not in at_step
    assert at_step["train/global_step"] == end_a["train/global_step"] == S
    assert sorted(p.name for p in (d["B"] / "eval_steps").iterdir()) == [path.name]


def test_callback_leaves_training_unchanged(runs):
    d, _ = runs
    wb = torch.load(d["B"] / "checkpoints" / "last.ckpt", weights_only=False)
    wc = torch.load(d["C"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert wb["global_step"] == wc["global_step"] == 2 * S
    assert wb["state_dict"].keys() == wc["state_dict"].keys()
    for k in wb["state_dict"]:
        assert torch.equal(wb["state_dict"][k], wc["state_dict"][k]), k
    mb, mc = read_metrics(d["B"]), read_metrics(d["C"])
    assert {k: v for k, v in mb.items() if k != "protocol/ckpt_path"} == {
        k: v for k, v in mc.items() if k != "protocol/ckpt_path"
    }


def test_evaluate_restores_mode_rng_and_weights(tmp_path, monkeypatch):
    """In-process: train mode, the global random state, the weights and the gradients are as before, even when
    the evaluation draws from the global generator."""
    original = eval_steps_module.evaluate_module

    def drawing(*args, **kwargs):
        torch.rand(3)
        return original(*args, **kwargs)

    monkeypatch.setattr(eval_steps_module, "evaluate_module", drawing)
    dm = GaussianDataModule(FixedCoupling(n_pairs=8, seed=0), dim=2)
    dm.setup()
    module = FlowMatchingModule(MLP(2), CFM(0.0), functools.partial(torch.optim.Adam)).train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cb = EvalAtSteps([3], Solver("euler", steps=4), EvalOptions(euler_steps=[2], n_fresh=16))
    trainer = SimpleNamespace(datamodule=dm, global_step=3, is_global_zero=True, default_root_dir=str(tmp_path))
    rng = torch.get_rng_state()
    cb.on_train_batch_start(trainer, module, None, 0)
    cb.on_train_batch_start(trainer, module, None, 1)  # a second micro-batch of the same step: once only
    assert torch.equal(torch.get_rng_state(), rng)
    assert module.training and module.model.training
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())
    assert cb.written == [tmp_path / "eval_steps" / "step=0000003.json"]
    values = json.loads(cb.written[0].read_text())
    assert values["protocol/solver"] == "euler4" and "eval/pair_acc@euler2" in values


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match="eval_steps.steps"):
        EvalAtSteps([])
    with pytest.raises(ValueError, match="eval_steps.steps"):
        EvalAtSteps([-1])
