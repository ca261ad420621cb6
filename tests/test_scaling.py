"""Scaling out: the trainer group's batch semantics (train/ keys, the start line), the fsdp refusal, and global
minibatch OT under DDP (coupling.global_ot) checked against a single-process OT of the union batch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import ot  # POT: an assignment solver independent of the code under test (scipy)
import pytest
import torch
from helpers import ROOT, read_metrics, run_entry

from flowmatch.couplings import OTCoupling
from flowmatch.data import GaussianDataModule
from flowmatch.entry import batch_protocol
from flowmatch.global_ot import global_ot_pair
from flowmatch.streams import stream_seed

TINY = [
    "data=gaussian",
    "data.dim=2",
    "data.batch_size=8",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.log_every_n_steps=2",
    "eval.enabled=false",
    "logger=none",
]


def test_batch_protocol_states_the_global_batch():
    out = batch_protocol(per_device=32, devices=4, nodes=2, accumulate=3)
    assert out["train/global_batch_size"] == 32 * 4 * 2 * 3
    assert out["train/world_size"] == 8 and out["train/lr_scale"] == 1.0


def test_one_process_run_records_its_batch(tmp_path):
    proc = run_entry("train.py", *TINY, "trainer.accumulate_grad_batches=2", f"hydra.run.dir={tmp_path}")
    m = read_metrics(tmp_path)
    assert m["train/global_batch_size"] == 16 and m["train/world_size"] == 1 and m["train/lr_scale"] == 1.0
    assert "flowmatch: global batch 16 = data.batch_size 8 per device x 1 device(s)" in proc.stdout


@pytest.mark.parametrize("callbacks", ["gradvar", "[ema,throughput]"])
def test_fsdp_refuses_callbacks_that_need_the_whole_model(tmp_path, callbacks):
    """trainer=fsdp with a probe or EMA stops with one error line naming the callback, before any work (before the
    no-GPU check too)."""
    proc = run_entry(
        "train.py", *TINY, "trainer=fsdp", f"callbacks={callbacks}", f"hydra.run.dir={tmp_path}", check=False
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    named = "callbacks.gradvar" if callbacks == "gradvar" else "callbacks.ema"
    assert "trainer.strategy=fsdp" in errors[0] and named in errors[0] and "trainer=ddp" in errors[0]
    assert "callbacks.throughput" not in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "checkpoints").exists()


def test_global_ot_without_a_process_group_is_the_batch_ot():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(12, 3, generator=g), torch.randn(12, 3, generator=g)
    a, b = global_ot_pair(x0, x1)
    assert torch.equal(a, x0) and torch.equal(b, OTCoupling().pair(x0, x1)[1])
    with pytest.raises(ValueError, match="coupling.global_ot must be true or false, got 'yes'"):
        OTCoupling(global_ot="yes")


def _truth_pairs(ranks: int, batch: int, steps: int, dim: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per rank and step, the pairs of one single-process exact OT (POT's network simplex) on the union of the
    ranks' unpaired batches, drawn here from the ranks' stream seeds exactly as each rank draws them."""
    dm = GaussianDataModule(OTCoupling(), dim=dim, batch_size=batch, seed=0)
    dm.setup()
    gens = [torch.Generator().manual_seed(stream_seed(0, "train", r)) for r in range(ranks)]
    out = [[] for _ in range(ranks)]
    for _ in range(steps):
        draws = [dm.coupling.draw_independent(batch, g) for g in gens]
        x0, x1 = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
        w = np.full(len(x0), 1 / len(x0))
        plan = ot.emd(w, w, ot.dist(x0.double().numpy(), x1.double().numpy()))  # squared Euclidean cost
        perm = torch.from_numpy(plan.argmax(1))
        for r in range(ranks):
            sl = slice(r * batch, (r + 1) * batch)
            out[r].append((x0[sl], x1[perm][sl], x1[sl]))
    return out


@pytest.mark.slow
def test_global_ot_under_two_gloo_ranks_equals_single_process_ot_of_the_union(tmp_path):
    """Two gloo processes run the real training stream with coupling.global_ot=true; each rank's pairs equal, to
    the bit, its slice of one exact OT of the union batch (and differ from per-rank OT: the check has teeth)."""
    ranks, batch, steps, dim = 2, 16, 3, 3
    proc = subprocess.run(
        [
            sys.executable,
            "tests/global_ot_ranks.py",
            str(tmp_path),
            "--ranks",
            str(ranks),
            "--batch",
            str(batch),
            "--steps",
            str(steps),
            "--dim",
            str(dim),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    truth = _truth_pairs(ranks, batch, steps, dim)
    differs = 0
    for r in range(ranks):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert len(got) == steps
        for (x0, x1), (t0, t1, unpaired) in zip(got, truth[r]):
            assert torch.equal(x0, t0) and torch.equal(x1, t1)
            differs += int(not torch.equal(x1, OTCoupling().pair(t0, unpaired)[1]))  # per-rank OT
    assert differs > 0


@pytest.mark.slow
def test_ddp_cpu_training_with_global_ot(tmp_path):
    """train.py trainer=ddp_cpu coupling=ot coupling.global_ot=true callbacks=[ema,throughput]: trains; rank 0 alone
    prints the start lines and writes metrics.json with the global batch of 2 processes; the EMA copy is of the raw
    network (its state_dict keys are the model's, no DDP ``module.`` prefix)."""
    proc = run_entry(
        "train.py", *TINY, "trainer=ddp_cpu", "coupling=ot", "coupling.global_ot=true", "callbacks=[ema,throughput]",
        "callbacks.throughput.warmup_steps=1", f"hydra.run.dir={tmp_path}", timeout=600,
    )  # fmt: skip
    m = read_metrics(tmp_path)
    assert m["train/global_batch_size"] == 16 and m["train/world_size"] == 2 and m["train/global_step"] == 4
    assert proc.stdout.count("flowmatch: global batch 16 = data.batch_size 8 per device x 2 device(s)") == 1
    assert proc.stdout.count("coupling.global_ot: one OT assignment per step over the union of 2 ranks") == 1
    assert (tmp_path / "throughput.json").exists()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    ema = next(v["ema_state_dict"] for v in ckpt["callbacks"].values() if "ema_state_dict" in v)
    assert sorted(ema) == sorted(k.removeprefix("model.") for k in ckpt["state_dict"])
