"""data=image_folder: a folder of PNG files the test writes itself, checked against the pixels it wrote."""

import numpy as np
import pytest
import torch
from helpers import write_pngs
from PIL import Image

from flowmatch.couplings import IndependentCoupling
from flowmatch.data import ImageFolderDataModule
from flowmatch.data.images import DatasetNotFoundError


def _module(root, **kw):
    kw = {"channels": 3, "image_size": 8, "seed": 1, "batch_size": 4, "val_size": 4, "test_size": 4, **kw}
    return ImageFolderDataModule(IndependentCoupling(), root=str(root), **kw)


def _expected(pixels: list) -> torch.Tensor:
    """The [-1, 1] tensor the written uint8 pixels should become: p / 127.5 - 1, channels first."""
    return torch.tensor(np.stack(pixels)).permute(0, 3, 1, 2).double() / 127.5 - 1


def _as_set(x: torch.Tensor) -> set:
    return {tuple(np.round(img.flatten().double().numpy(), 5)) for img in x}


def test_every_image_lands_once_in_train_or_holdout_with_its_pixels(tmp_path):
    pixels = write_pngs(tmp_path / "a", n=5, seed=0) + write_pngs(tmp_path / "b" / "deeper", n=5, seed=1)
    dm = _module(tmp_path, holdout_fraction=0.2)
    dm.setup()
    train, held = dm.train_data, dm.held_out("val")
    assert train.shape == (8, 3, 8, 8) and held.shape == (2, 3, 8, 8)  # 20 % of 10 held out
    assert train.min() >= -1 and train.max() <= 1
    assert _as_set(torch.cat([train, held])) == _as_set(_expected(pixels))  # same size: no resampling
    assert not _as_set(train) & _as_set(held)
    x0, x1 = next(iter(dm.train_dataloader()))
    assert x0.shape == x1.shape == (4, 3, 8, 8)


def test_greyscale_and_resize(tmp_path):
    write_pngs(tmp_path, n=3, size=16, channels=1)
    Image.fromarray(np.full((8, 24, 3), 255, dtype=np.uint8)).save(tmp_path / "wide.png")  # white, not square
    dm = _module(tmp_path, channels=1, image_size=4, holdout_fraction=0.5)
    dm.setup()
    everything = torch.cat([dm.train_data, dm.held_out("test")])
    assert everything.shape == (4, 1, 4, 4)
    assert any(torch.equal(img, torch.ones(1, 4, 4)) for img in everything)  # the white one stays exactly 1


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p / "missing", "is not a folder"),
        (lambda p: p, "holds no images"),
        (lambda p: (p / "notes.txt").write_text("x") and p, "holds no images"),
        (lambda p: write_pngs(p, n=1) and p, "at least 2"),
    ],
)
def test_bad_root_names_the_key_and_value(tmp_path, make, words):
    root = make(tmp_path)
    with pytest.raises(DatasetNotFoundError) as exc:
        _module(root)
    message = str(exc.value)
    assert "data.root=" in message and str(root) in message and words in message
    assert "\n" not in message


def test_bad_options(tmp_path):
    write_pngs(tmp_path, n=2)
    with pytest.raises(ValueError, match="data.channels must be one of"):
        _module(tmp_path, channels=2)
    with pytest.raises(ValueError, match="data.holdout_fraction"):
        _module(tmp_path, holdout_fraction=1.0)
