"""EMA callback: the update rule by hand, checkpoint round trip, resume through train.py, EMA in evaluation."""

from types import SimpleNamespace

import pytest
import torch
from helpers import read_metrics, run_entry
from omegaconf import OmegaConf
from torch import nn

from flowmatch.callbacks.ema import EMA
from flowmatch.entry import build
from flowmatch.evaluation import EvalOptions, evaluate_flow
from flowmatch.interpolants import CFM
from flowmatch.module import FlowMatchingModule
from flowmatch.sampling import Solver


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x, t):
        return self.lin(x).expand_as(x)


def _stubs(net):
    trainer = SimpleNamespace(global_step=0)
    pl_module = SimpleNamespace(model=net, device=torch.device("cpu"), sampling_model=None)
    return trainer, pl_module


def _set(net, w, b, count):
    with torch.no_grad():
        net.lin.weight.fill_(w), net.lin.bias.fill_(b), net.count.fill_(count)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_hand_computation(warmup):
    net = Net()
    _set(net, 1.0, -2.0, 0)
    cb = EMA(decay=0.9, warmup=warmup)
    trainer, pl_module = _stubs(net)
    cb.on_fit_start(trainer, pl_module)
    assert pl_module.sampling_model is cb.ema_model and cb.ema_model is not net
    e_w, e_b = 1.0, -2.0
    for n, (w, b) in enumerate([(3.0, 0.0), (5.0, 1.0), (-1.0, 4.0)], start=1):
        _set(net, w, b, n)
        trainer.global_step = n
        cb.on_train_batch_end(trainer, pl_module, None, None, n - 1)
        d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        e_w, e_b = d * e_w + (1 - d) * w, d * e_b + (1 - d) * b
        assert cb.ema_model.lin.weight.flatten().tolist() == pytest.approx([e_w, e_w], abs=1e-6)
        assert cb.ema_model.lin.bias.item() == pytest.approx(e_b, abs=1e-6)
        assert cb.ema_model.count.item() == n  # buffers are copied
    assert cb.num_updates == 3
    if not warmup:  # 0.9^3 * 1 + 0.1 * (0.9^2 * 3 + 0.9 * 5 - 1) = 1.322
        assert e_w == pytest.approx(1.322)
    cb.on_train_batch_end(trainer, pl_module, None, None, 3)  # same global_step: no optimizer step, no update
    assert cb.num_updates == 3
    assert not any(p.requires_grad for p in cb.ema_model.parameters())


def test_ema_state_round_trip_before_fit_start():
    net = Net()
    cb = EMA(decay=0.5)
    trainer, pl_module = _stubs(net)
    cb.on_fit_start(trainer, pl_module)
    _set(net, 4.0, 4.0, 1)
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, pl_module, None, None, 0)
    state = cb.state_dict()
    fresh_net = Net()
    new = EMA(decay=0.5)
    new.load_state_dict(state)  # Lightning restores callbacks before on_fit_start
    t2, m2 = _stubs(fresh_net)
    new.on_fit_start(t2, m2)
    assert new.num_updates == 1
    for a, b in zip(new.ema_model.state_dict().values(), cb.ema_model.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert not torch.equal(new.ema_model.lin.weight, fresh_net.lin.weight)


def test_module_sampling_model_is_not_a_submodule_and_follows_to():
    module = FlowMatchingModule(Net(), CFM(0.0), torch.optim.Adam)
    ema = Net()
    module.sampling_model = ema
    assert not any(k.startswith("sampling_model") for k in module.state_dict())
    assert module.velocity_model() is ema and len(list(module.parameters())) == 2
    module.double()
    assert ema.lin.weight.dtype == torch.float64  # moved with the module (.to / .cuda too)
    x = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(module.velocity(x, torch.zeros(3)), ema(x, None))
    module2 = FlowMatchingModule(Net(), CFM(0.0), torch.optim.Adam)
    ckpt = {"callbacks": {"EMA": {"ema_state_dict": {k: v + 1 for k, v in module2.model.state_dict().items()}}}}
    assert module2.load_ema_from_checkpoint(ckpt)
    torch.testing.assert_close(module2.sampling_model.lin.bias, module2.model.lin.bias + 1)
    assert not module2.load_ema_from_checkpoint({"callbacks": {}})


def test_compile_option_off_by_default_and_wraps_model(monkeypatch):
    calls, real_compile = [], torch.compile

    def eager_compile(model, **kw):  # a real Dynamo wrapper, without the slow inductor backend
        calls.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    plain = FlowMatchingModule(Net(), CFM(0.0), torch.optim.Adam)
    assert plain.train_model() is plain.model and not calls
    compiled = FlowMatchingModule(Net(), CFM(0.0), torch.optim.Adam, compile=True)
    batch = (torch.randn(4, 2), torch.randn(4, 2))
    compiled.log = lambda *args, **kwargs: None  # no trainer attached
    compiled.training_step(batch, 0), compiled.training_step(batch, 1)
    assert calls == [compiled.model]  # compiled once, at the first step
    assert isinstance(compiled._compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert not any(k.startswith("_compiled") for k in compiled.state_dict())


FAST = [
    "data=digits",
    "model=unet",
    "coupling=fixed",
    "coupling.n_pairs=16",
    "interpolant=cfm",
    "debug=fast",
    "solver=euler",
    "solver.steps=4",
    "eval.euler_steps=[1]",
    "callbacks=ema",
    "callbacks.ema.decay=0.99999",
    "callbacks.ema.warmup=false",
]


def _ema_and_model(path):
    ck = torch.load(path, weights_only=False)
    state = ck["callbacks"]["EMA"]
    model = {k[len("model.") :]: v for k, v in ck["state_dict"].items() if k.startswith("model.")}
    assert not any(k.startswith("sampling_model") for k in ck["state_dict"])
    return state, model


def _dist(a: dict, b: dict) -> float:
    return sum((a[k].float() - b[k].float()).pow(2).sum() for k in a if a[k].is_floating_point()).sqrt().item()


def test_resume_keeps_ema_state_and_evaluate_uses_ema(tmp_path):
    run_entry("train.py", *FAST, f"hydra.run.dir={tmp_path / 'a'}")
    ema_a, model_a = _ema_and_model(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert ema_a["num_updates"] == 20 and read_metrics(tmp_path / "a")["protocol/ema"] == "true"
    run_entry(
        "train.py",
        *FAST,
        "trainer.max_steps=30",
        f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={tmp_path / 'b'}",
    )
    ck_b = tmp_path / "b" / "checkpoints" / "last.ckpt"
    ema_b, model_b = _ema_and_model(ck_b)
    assert ema_b["num_updates"] == 30
    # decay 0.99999: the EMA barely moves in 10 steps. Restarted from the model it would jump to model_a.
    ema_wa, ema_wb = ema_a["ema_state_dict"], ema_b["ema_state_dict"]
    assert _dist(ema_wb, ema_wa) < 0.05 * _dist(ema_wa, model_a)
    assert _dist(ema_wb, ema_wa) > 0  # ... but it was updated
    run_entry(
        "evaluate.py",
        f"ckpt_path={ck_b}",
        "eval.n_fresh=64",
        "eval.euler_steps=[1]",
        "eval.fid=true",
        "eval.feature_extractor={_target_:torch.nn.Flatten}",
        f"hydra.run.dir={tmp_path / 'e'}",
    )
    m = read_metrics(tmp_path / "e")
    assert m["protocol/ema"] == "true" and m["protocol/feature_extractor"] == "Flatten" and m["eval/fid"] > 0
    # the same evaluation in-process, with the EMA weights and with the raw weights
    ck = torch.load(ck_b, weights_only=False)
    dm, module, _ = build(OmegaConf.create(ck["hyper_parameters"]["config"]))
    module.load_state_dict(ck["state_dict"])
    dm.load_state_dict(ck["DigitsDataModule"])
    module.eval()
    res = {}
    for use_ema in (False, True):
        if use_ema:
            assert module.load_ema_from_checkpoint(ck)
        res[use_ema] = evaluate_flow(
            module.velocity,
            dm.eval_setup(),
            Solver("euler", steps=4),
            EvalOptions(euler_steps=[1], n_fresh=64, seed=12345),
        ).metrics
    assert m["eval/mmd_gen"] == pytest.approx(res[True]["eval/mmd_gen"], rel=1e-5)
    assert m["eval/mmd_gen"] != pytest.approx(res[False]["eval/mmd_gen"], rel=1e-3)
