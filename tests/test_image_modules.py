"""Image DataModules (cifar10, celeba, digits, random_images): in-process checks and runs through train.py."""

import pytest
import torch
import yaml
from helpers import read_metrics, run_entry
from test_images import CIFAR_TEST_SIZE, CIFAR_TRAIN_SIZES, _write_celeba, _write_cifar

from flowmatch.couplings import FixedCoupling, IndependentCoupling, OTCoupling
from flowmatch.data import CIFAR10DataModule, DigitsDataModule, RandomImageDataModule
from flowmatch.distributions import Empirical, StandardNormal

SMALL = [
    "model=unet",
    "solver=euler",
    "solver.steps=3",
    "eval.euler_steps=[1]",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "eval.n_fresh=16",
    "data.batch_size=4",
    "trainer.enable_progress_bar=false",
]


def test_digits_module_splits_range_and_subset():
    dm = DigitsDataModule(IndependentCoupling(), holdout=297, subset=100, seed=3, batch_size=8, val_size=20)
    dm.setup()
    assert dm.p0.shape == dm.p1.shape == (1, 8, 8) and isinstance(dm.p1, Empirical)
    assert dm.train_data.shape == (100, 1, 8, 8) and dm.train_data.min() >= -1 and dm.train_data.max() <= 1
    held = dm.held_out("test")
    assert held.shape == (297, 1, 8, 8)
    full = DigitsDataModule(IndependentCoupling(), holdout=297, seed=3)
    full.setup()
    assert len(full.train_data) == 1797 - 297
    # held-out digits are not training digits, and every subset digit is a training digit
    d = torch.cdist(held.flatten(1), full.train_data.flatten(1))
    assert len(full.train_data) + len(held) == 1797 and (d.min(1).values > 0).float().mean() > 0.9
    assert (torch.cdist(dm.train_data.flatten(1), full.train_data.flatten(1)).min(1).values == 0).all()
    x0, x1 = next(iter(dm.val_dataloader()))
    assert x0.shape == x1.shape == (8, 1, 8, 8)
    assert (torch.cdist(x1.flatten(1), held.flatten(1)).min(1).values == 0).all()  # val data = held-out digits
    assert x0.std() > 0.5  # fresh N(0, I) noise at t = 0 (forward)
    other = DigitsDataModule(IndependentCoupling(), holdout=297, subset=100, seed=4)
    other.setup()
    assert not torch.equal(other.train_data, dm.train_data)  # subset / split drawn by seed


def test_backward_direction_and_ot_held_out_pairs():
    dm = DigitsDataModule(OTCoupling(), direction="backward", seed=0, batch_size=16, val_size=16)
    dm.setup()
    x0, x1 = dm.held_out_pairs(16, torch.Generator().manual_seed(0), "val")
    assert (torch.cdist(x0.flatten(1), dm.held_out("val").flatten(1)).min(1).values == 0).all()  # data at t = 0
    cost = (x0 - x1).flatten(1).pow(2).sum()
    assert all(cost <= (x0 - x1[torch.randperm(16)]).flatten(1).pow(2).sum() + 1e-4 for _ in range(5))
    setup = dm.eval_setup()
    assert setup.train_data is None and setup.test_data is None  # p1 is noise: no image metrics


def test_hflip_and_device_empirical():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    plain, flipped = Empirical(x), Empirical(x, hflip=True)
    s = flipped.sample(200, torch.Generator().manual_seed(0))
    is_flip = torch.stack([(s == x[i].flip(-1)).flatten(1).all(1) for i in range(2)]).any(0)
    assert 0.3 < is_flip.float().mean() < 0.7
    assert not plain.sample(50, torch.Generator().manual_seed(0)).flip(-1).eq(x[0]).flatten(1).all(1).any()
    # same stream as Empirical on the CPU
    a = Empirical(x, hflip=True).sample(64, torch.Generator().manual_seed(1))
    assert torch.equal(a, flipped.sample(64, torch.Generator().manual_seed(1)))
    n = StandardNormal((3, 4, 4)).sample(5000, torch.Generator().manual_seed(0))
    assert n.shape == (5000, 3, 4, 4) and abs(n.mean()) < 0.01 and abs(n.std() - 1) < 0.01


def test_device_option_validation_and_shape_checks():
    with pytest.raises(ValueError, match="data.device"):
        DigitsDataModule(IndependentCoupling(), device="tpu")
    with pytest.raises(ValueError, match="data.dim"):
        CIFAR10DataModule(IndependentCoupling(), dim=64)
    dm = DigitsDataModule(IndependentCoupling(), image_size=16, dim=256)  # upsample=1 gives 8x8
    with pytest.raises(ValueError, match="image_size"):
        dm.setup()
    dm = DigitsDataModule(IndependentCoupling(), device="auto")
    dm.setup()  # no trainer (and no GPU): stays on the CPU
    assert dm.data_device.type == "cpu" and dm.p1.data.device.type == "cpu"


def test_cifar_module_in_process(tmp_path):
    train, test = _write_cifar(tmp_path)
    dm = CIFAR10DataModule(
        FixedCoupling(n_pairs=5, seed=0),
        root=str(tmp_path),
        verify_checksums=False,
        subset=7,
        seed=0,
        batch_size=4,
        val_size=100,
    )
    dm.setup()
    assert dm.train_data.shape == (7, 3, 32, 32) and dm.coupling.pairs[1].shape == (5, 3, 32, 32)
    assert dm.held_out("val").shape == (CIFAR_TEST_SIZE, 3, 32, 32)  # the test split
    x0, x1 = dm.held_out_pairs(100, torch.Generator().manual_seed(0), "val")
    assert len(x1) == CIFAR_TEST_SIZE
    expected = torch.from_numpy(test).float().reshape(-1, 3, 32, 32) / 127.5 - 1
    assert (torch.cdist(x1.flatten(1), expected.flatten(1)).min(1).values < 1e-4).all()
    setup = dm.eval_setup()
    assert setup.train_data is dm.train_data and setup.test_data().shape == (CIFAR_TEST_SIZE, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="md5"):  # checksums on by default: fabricated files fail them
        CIFAR10DataModule(IndependentCoupling(), root=str(tmp_path)).setup()


def test_random_images_module_is_synthetic():
    dm = RandomImageDataModule(IndependentCoupling(), n_images=32, val_size=8, seed=0)
    dm.setup()
    assert dm.train_data.shape == (32, 3, 32, 32) and -1 <= dm.train_data.min() and dm.train_data.max() <= 1
    assert dm.held_out("val").shape == (8, 3, 32, 32)


def test_cifar10_through_train_py(tmp_path):
    _write_cifar(tmp_path / "data")
    run = tmp_path / "run"
    run_entry(
        "train.py",
        "data=cifar10",
        *SMALL,
        f"data.root={tmp_path / 'data'}",
        "data.verify_checksums=false",
        "data.subset=10",
        "data.hflip=true",
        "eval.w2_max_dim=0",
        "coupling=fixed",
        "coupling.n_pairs=6",
        f"hydra.run.dir={run}",
    )
    m = read_metrics(run)
    assert m["train/global_step"] == 4.0 and "val/loss" in m and "eval/pair_acc" in m
    assert 0.0 <= m["eval/mem_rate"] <= 1.0
    assert m["protocol/solver"] == "euler3" and m["protocol/n_samples"] == 16.0 and m["protocol/ema"] == "false"
    assert all(isinstance(v, float) for k, v in m.items() if not k.startswith("protocol/"))
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["data"]["dim"] == 3072
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["hyper_parameters"]["config"]["model"]["in_channels"] == 3
    assert ck["CIFAR10DataModule"]["coupling"]["x1"].shape == (6, 3, 32, 32)
    assert sum(CIFAR_TRAIN_SIZES) > 10


def test_celeba_through_train_py(tmp_path):
    _write_celeba(tmp_path / "data")
    run = tmp_path / "run"
    run_entry(
        "train.py",
        "data=celeba",
        *SMALL,
        f"data.root={tmp_path / 'data'}",
        "data.verify_checksums=false",
        "data.image_size=16",
        "data.dim=768",
        "data.crop=178",
        "eval.w2_max_dim=0",
        f"hydra.run.dir={run}",
    )
    m = read_metrics(run)
    assert m["train/global_step"] == 4.0 and "val/loss" in m and "eval/mem_rate" in m


@pytest.mark.parametrize(
    "data,layout",
    [
        ("cifar10", "cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch"),
        ("celeba", "celeba/img_align_celeba/*.jpg"),
    ],
)
def test_missing_data_one_clear_error(tmp_path, data, layout):
    proc = run_entry(
        "train.py",
        f"data={data}",
        "model=unet",
        f"data.root={tmp_path / 'nothing'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "not found under root=" in lines[0], proc.stderr
    assert layout in proc.stderr and "download=True" in proc.stderr and "To get it:" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu_when_allowed(tmp_path):
    """scripts/gpu_check.sh (make gpu-check) with ALLOW_CPU=1 at tiny size: train.py on unet_cifar for a few steps,
    then the Lightning-vs-bare loop on a tiny UNet, and the summary block."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    loop = (
        "--steps 2 --warmup 1 --rounds 1 --compile false --precision 32-true --probe-size 20 threads=1 model=unet "
        "model.base_channels=8 data.image_size=8 data.dim=192 data.n_images=32 data.batch_size=4"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PY": sys.executable, "OUT": str(tmp_path), "ALLOW_CPU": "1"}
    proc = subprocess.run(
        [
            "bash",
            "scripts/gpu_check.sh",
            "trainer=cpu",
            "trainer.max_steps=3",
            "data.batch_size=2",
            "data.n_images=16",
            "callbacks.throughput.warmup_steps=1",
            "threads=1",
        ],
        cwd=ROOT,
        env={**env, "LOOP_ARGS": loop},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "35,746,307 parameters" in proc.stdout and "steps/s" in proc.stdout
    summary = proc.stdout.split("flowmatch gpu-check: summary", 1)[1]
    assert "train.py throughput" in summary and "32-true" in summary and "gradient-variance probe" in summary
    assert (tmp_path / "throughput.json").exists() and (tmp_path / "gpu_loop.json").exists()
