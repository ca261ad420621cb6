"""Sample-grid callback: PNGs in the run dir, loggers with log_image, pair rows; digits end to end."""

import lightning as L
import pytest
import torch
from helpers import read_metrics, run_entry
from lightning.pytorch.loggers import Logger
from PIL import Image

from flowmatch.callbacks.samples import SampleGrid
from flowmatch.couplings import FixedCoupling, IndependentCoupling, ot_assignment
from flowmatch.data import DigitsDataModule, GaussianDataModule
from flowmatch.interpolants import CFM
from flowmatch.models.unet import UNet
from flowmatch.module import FlowMatchingModule


class ImageLogger(Logger):
    """A logger with ``log_image`` (like WandbLogger) that records the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.images = []

    name, version = "fake", "0"

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_image(self, key, images, step=None, **kwargs) -> None:
        self.images.append((key, list(images), step))


def _fit(tmp_path, dm, callback, loggers, steps=4):
    model = UNet(1, 8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=())
    module = FlowMatchingModule(model, CFM(0.05), lambda p: torch.optim.Adam(p, lr=1e-3))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=loggers,
        callbacks=[callback],
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    return module


def test_grid_files_and_image_loggers(tmp_path):
    dm = DigitsDataModule(IndependentCoupling(), batch_size=8, seed=0)
    cb = SampleGrid(every_n_steps=2, n_samples=6, nrow=3, steps=2, min_size=8)
    logger = ImageLogger()
    csv = L.pytorch.loggers.CSVLogger(str(tmp_path), name="csv")  # no log_image: skipped
    _fit(tmp_path, dm, cb, [csv, logger])
    files = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert files == ["step_000002.png", "step_000004.png"]  # the end-of-training grid is not written twice
    assert [(k, s) for k, _, s in logger.images] == [("samples", 2), ("samples", 4)]
    assert logger.images[0][1] == [str(tmp_path / "samples" / "step_000002.png")]
    with Image.open(tmp_path / "samples" / "step_000004.png") as im:
        w, h = im.size
    assert (w, h) == (3 * (8 + 2) + 2, 2 * (8 + 2) + 2)  # 6 samples, 3 per row, padding 2


def test_pair_rows_for_finite_couplings(tmp_path):
    dm = DigitsDataModule(FixedCoupling(n_pairs=12, seed=0), batch_size=8, seed=0)
    cb = SampleGrid(every_n_steps=100, n_pairs_shown=5, steps=2, min_size=16)
    module = _fit(tmp_path, dm, cb, [], steps=2)
    x0, x1 = dm.coupling.pairs
    torch.testing.assert_close(cb.rows["x0"], x0[:5])
    torch.testing.assert_close(cb.rows["x1"], x1[:5])
    torch.testing.assert_close(cb.rows["ot"], x1[ot_assignment(x0, x1)][:5])
    grid = cb.grid(module)
    assert grid.shape == (3, 4 * (16 + 2) + 2, 5 * (16 + 2) + 2)  # rows: source, endpoint, partner, OT partner
    cell = grid[0, 2 + 2 * 18 : 2 + 2 * 18 + 16 : 2, 2 : 2 + 16 : 2]  # partner of pair 0, de-enlarged
    torch.testing.assert_close(cell, ((x1[0, 0] + 1) / 2).clamp(0, 1))
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["pairs_step_000002.png", "step_000002.png"]


class LinearField(torch.nn.Module):
    """v(x, t) = A x + b."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x, t):
        return self.lin(x)


def test_non_image_data_is_skipped_with_a_warning(tmp_path):
    dm = GaussianDataModule(IndependentCoupling(), dim=2, batch_size=8)
    cb = SampleGrid(every_n_steps=1)
    module = FlowMatchingModule(LinearField(), CFM(0.0), lambda p: torch.optim.Adam(p))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        callbacks=[cb],
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="not images"):
        trainer.fit(module, datamodule=dm)
    assert not (tmp_path / "samples").exists()


def test_digits_end_to_end_with_callbacks_images(tmp_path):
    """train.py data=digits model=unet coupling=fixed callbacks=images: PNGs, eval/mem_rate, FID skipped clearly."""
    proc = run_entry(
        "train.py",
        "data=digits",
        "model=unet",
        "coupling=fixed",
        "coupling.n_pairs=32",
        "interpolant=cfm",
        "interpolant.sigma=0.05",
        "callbacks=images",
        "debug=fast",
        "solver=euler",
        "solver.steps=5",
        "callbacks.samples.every_n_steps=10",
        "eval.fid=true",
        f"hydra.run.dir={tmp_path}",
    )
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == [
        "pairs_step_000010.png",
        "pairs_step_000020.png",
        "step_000010.png",
        "step_000020.png",
    ]
    with Image.open(tmp_path / "samples" / "pairs_step_000020.png") as im:
        w, h = im.size
    assert (w, h) == (8 * 34 + 2, 4 * 34 + 2)  # 8 pairs x 4 rows of 8x8 digits enlarged to 32 px
    with Image.open(tmp_path / "samples" / "step_000020.png") as im:
        assert im.size == (8 * 34 + 2, 8 * 34 + 2)  # 64 samples from the fixed noise batch, 8 per row
    m = read_metrics(tmp_path)
    assert 0.0 <= m["eval/mem_rate"] <= 1.0 and "eval/pair_acc" in m and "eval/mmd_gen" in m
    assert "eval/fid" not in m and m["protocol/feature_extractor"] == "inception (unavailable)"
    assert m["protocol/ema"] == "true" and m["protocol/solver"] == "euler5" and m["protocol/nfe"] == 5.0
    assert "eval/fid and eval/kid skipped" in proc.stderr and "torch-fidelity" in proc.stderr
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["callbacks"]["EMA"]["num_updates"] == 20
