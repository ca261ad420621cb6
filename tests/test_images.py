"""Image loaders on fabricated files in the real on-disk formats (no network, no real data sets)."""

from __future__ import annotations

import pickle
import sys
import types
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch.data import images
from flowmatch.data.images import (
    DatasetIntegrityError,
    DatasetNotFoundError,
    load_celeba,
    load_cifar10,
    load_digits,
    subset,
    to_unit_range,
)

# ------------------------------------------------------------------------------------------------ CIFAR-10

CIFAR_TRAIN_SIZES = [3, 2, 4, 1, 2]  # per data_batch_1..5
CIFAR_TEST_SIZE = 3


def _write_cifar(root, seed=0):
    """Fabricate cifar-10-batches-py/ with random images; return (train rows, test rows) as (N, 3072) uint8."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name, n):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        data[0, :2] = (0, 255)  # make sure both extremes occur
        entry = {
            "batch_label": f"fabricated {name}",
            "labels": rng.integers(0, 10, size=n).tolist(),
            "data": data,
            "filenames": [f"img_{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        return data

    train = np.concatenate([batch(f"data_batch_{i + 1}", n) for i, n in enumerate(CIFAR_TRAIN_SIZES)])
    test = batch("test_batch", CIFAR_TEST_SIZE)
    meta = {
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "num_cases_per_batch": 10000,
        "num_vis": 3072,
    }
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return train, test


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().to(torch.uint8).numpy()


def test_cifar10_round_trip_and_channel_layout(tmp_path):
    train, test = _write_cifar(tmp_path)
    x = load_cifar10(tmp_path, split="train", verify_checksums=False)
    assert x.shape == (sum(CIFAR_TRAIN_SIZES), 3, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    # A CIFAR row is 1024 R values, then 1024 G, then 1024 B, each row-major over 32 x 32.
    assert np.array_equal(_to_uint8(x), train.reshape(-1, 3, 32, 32))
    r, g, b = train[1, 5 * 32 + 7], train[1, 1024 + 5 * 32 + 7], train[1, 2048 + 5 * 32 + 7]
    assert x[1, :, 5, 7].tolist() == pytest.approx([r / 127.5 - 1, g / 127.5 - 1, b / 127.5 - 1], abs=1e-6)
    xt = load_cifar10(tmp_path, split="test", verify_checksums=False)
    assert xt.shape == (CIFAR_TEST_SIZE, 3, 32, 32)
    assert np.array_equal(_to_uint8(xt), test.reshape(-1, 3, 32, 32))


def test_cifar10_checksums_on_fabricated_files_raise_integrity_error(tmp_path):
    _write_cifar(tmp_path)
    with pytest.raises(DatasetIntegrityError, match="verify_checksums=False") as info:
        load_cifar10(tmp_path, verify_checksums=True)
    assert "data_batch_1" in str(info.value) and "batches.meta" in str(info.value)
    assert isinstance(info.value, DatasetNotFoundError)


def test_cifar10_missing_raises_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(tmp_path)
    msg = str(info.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "test_batch" in msg
    assert "batches.meta" in msg and "download=True" in msg and not isinstance(info.value, DatasetIntegrityError)
    # A partial copy names exactly what is missing.
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing: data_batch_3\)"):
        load_cifar10(tmp_path, split="test", verify_checksums=False)


def test_cifar10_download_without_network_raises_clear_error(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py") as info:
        load_cifar10(tmp_path / "data", download=True)
    assert isinstance(info.value.__cause__, OSError)  # URLError is an OSError
    assert "download failed" in str(info.value)


def test_cifar10_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, split="valid")


# -------------------------------------------------------------------------------------------------- CelebA

W, H = 178, 218
PARTITION = [0, 0, 0, 0, 1, 1, 2, 2]  # >= 2 images per split (torchvision fails on a split of exactly one)
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _colour(i):
    return (20 * i + 30, 200 - 15 * i, 10 * i + 5)


def _write_celeba(root, special=None):
    """Fabricate <root>/celeba/ in the real format: image i is one flat colour; ``special`` maps an index to an
    image array to use instead."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(PARTITION))]
    for i, name in enumerate(names):
        arr = (special or {}).get(i)
        if arr is None:
            arr = np.empty((H, W, 3), np.uint8)
            arr[:] = _colour(i)
        Image.fromarray(arr).save(folder / "img_align_celeba" / name, quality=100, subsampling=0)
    n = len(names)
    attr_names = [f"Attr_{k}" for k in range(40)]
    lm_names = [
        "lefteye_x",
        "lefteye_y",
        "righteye_x",
        "righteye_y",
        "nose_x",
        "nose_y",
        "leftmouth_x",
        "leftmouth_y",
        "rightmouth_x",
        "rightmouth_y",
    ]
    files = {
        "list_eval_partition.txt": [f"{nm} {p}" for nm, p in zip(names, PARTITION)],
        "identity_CelebA.txt": [f"{nm} {100 + i}" for i, nm in enumerate(names)],
        "list_bbox_celeba.txt": [str(n), "image_id x_1 y_1 width height"] + [f"{nm}    95  71 226 313" for nm in names],
        "list_landmarks_align_celeba.txt": [str(n), " ".join(lm_names)]
        + [f"{nm}  69  109  106  113   77  142   73  152  108  154" for nm in names],
        "list_attr_celeba.txt": [str(n), " ".join(attr_names) + " "]
        + [nm + "".join(" -1" if (i + k) % 3 else "  1" for k in range(40)) for i, nm in enumerate(names)],
    }
    for fname, lines in files.items():
        (folder / fname).write_text("\n".join(lines) + "\n")
    return folder


def _mean_colour(x):
    return ((x + 1) * 127.5).mean(dim=(-1, -2))  # (N, 3) in 0..255


def test_celeba_shapes_and_split_selection(tmp_path):
    _write_celeba(tmp_path)
    expected = {"train": [0, 1, 2, 3], "valid": [4, 5], "test": [6, 7], "all": list(range(8))}
    for split, idx in expected.items():
        x = load_celeba(tmp_path, split=split, verify_checksums=False)
        assert x.shape == (len(idx), 3, 64, 64) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        want = torch.tensor([_colour(i) for i in idx], dtype=torch.float32)
        assert torch.allclose(_mean_colour(x), want, atol=3.0), split
    assert load_celeba(tmp_path, split="test", size=32, crop=178, verify_checksums=False).shape == (2, 3, 32, 32)


def test_celeba_subset_is_reproducible_and_drawn_before_decoding(tmp_path, monkeypatch):
    _write_celeba(tmp_path)
    full = load_celeba(tmp_path, split="all", verify_checksums=False)
    decoded = []
    real_decode = images._decode_face
    monkeypatch.setattr(images, "_decode_face", lambda p, c, s: decoded.append(p) or real_decode(p, c, s))
    a = load_celeba(tmp_path, split="all", subset=3, seed=1, verify_checksums=False)
    assert len(decoded) == 3  # only the drawn images are decoded
    b = load_celeba(tmp_path, split="all", subset=3, seed=1, verify_checksums=False)
    c = load_celeba(tmp_path, split="all", subset=3, seed=2, verify_checksums=False)
    assert a.shape == (3, 3, 64, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, subset(full, 3, seed=1))
    serial = load_celeba(tmp_path, split="all", num_workers=1, verify_checksums=False)
    threaded = load_celeba(tmp_path, split="all", num_workers=3, verify_checksums=False)
    assert torch.equal(serial, full) and torch.equal(threaded, full)
    with pytest.raises(ValueError, match="subset"):
        load_celeba(tmp_path, split="valid", subset=3, verify_checksums=False)


def test_celeba_center_crop(tmp_path):
    # Image 0: the centre 140 x 140 square (torchvision's center_crop offsets: left 19, top 39) red, the rest blue.
    arr = np.empty((H, W, 3), np.uint8)
    arr[:] = BLUE
    arr[39 : 39 + 140, 19 : 19 + 140] = RED
    _write_celeba(tmp_path, special={0: arr})
    x = load_celeba(tmp_path, split="train", crop=140, size=64, verify_checksums=False)[0]
    px = (x + 1) * 127.5
    red = torch.tensor(RED, dtype=torch.float32)[:, None, None]
    assert (px - red).abs().max() < 20  # every pixel red, the border rows/columns included (JPEG tolerance)
    # The largest square (178) keeps blue bands: 39 - 20 = 19 rows on top and bottom, 19 columns each side.
    y = (load_celeba(tmp_path, split="train", crop=178, size=64, verify_checksums=False)[0] + 1) * 127.5
    blue = torch.tensor(BLUE, dtype=torch.float32)
    for r, c in [(0, 32), (63, 32), (32, 0), (32, 63), (1, 1)]:
        assert (y[:, r, c] - blue).abs().max() < 20, (r, c)
    assert (y[:, 32, 32] - red[:, 0, 0]).abs().max() < 20


def test_celeba_checksums_on_fabricated_files_raise_integrity_error(tmp_path):
    _write_celeba(tmp_path)
    with pytest.raises(DatasetIntegrityError, match="list_eval_partition.txt"):
        load_celeba(tmp_path, verify_checksums=True)


def test_celeba_missing_raises_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_celeba(tmp_path)
    msg = str(info.value)
    for part in [
        "celeba/img_align_celeba/",
        "list_eval_partition.txt",
        "identity_CelebA.txt",
        "list_bbox_celeba.txt",
        "list_landmarks_align_celeba.txt",
        "list_attr_celeba.txt",
        "download=True",
        "Google Drive",
    ]:
        assert part in msg, part
    # Listed in the partition file but absent on disk.
    folder = _write_celeba(tmp_path / "partial")
    (folder / "img_align_celeba" / "000005.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match="000005.jpg"):
        load_celeba(tmp_path / "partial", split="valid", verify_checksums=False)


@pytest.mark.parametrize("gdown", ["absent", "offline"])
def test_celeba_download_without_network_raises_clear_error(tmp_path, monkeypatch, gdown):
    if gdown == "absent":
        monkeypatch.setitem(sys.modules, "gdown", None)  # `import gdown` fails
    else:

        def download(*args, **kwargs):
            raise ConnectionError("no network (test)")

        monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=download))
    with pytest.raises(DatasetNotFoundError, match="img_align_celeba") as info:
        load_celeba(tmp_path, download=True)
    assert info.value.__cause__ is not None and "Google Drive" in str(info.value)


# -------------------------------------------------------------------------------------------------- digits


def test_digits():
    x = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    values = torch.unique((x + 1) * 8)
    assert torch.equal(values, values.round()) and values.max() == 16  # the 17 levels 0..16
    x4 = load_digits(upsample=4)
    assert x4.shape == (1797, 1, 32, 32)
    assert torch.equal(x4[:, :, ::4, ::4], x) and torch.equal(x4[:, :, 3::4, 2::4], x)  # nearest: 4x4 blocks
    xb = load_digits(upsample=2, mode="bilinear")
    assert xb.shape == (1797, 1, 16, 16) and xb.min() >= -1 and xb.max() <= 1
    assert not torch.equal(xb, load_digits(upsample=2))
    with pytest.raises(ValueError):
        load_digits(upsample=0)


def test_to_unit_range_and_subset():
    u = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    v = to_unit_range(u)
    assert v.dtype == torch.float32 and v[0] == -1 and v[-1] == 1
    assert torch.equal(((v + 1) * 127.5).round().to(torch.uint8), u)
    x = torch.arange(100)
    s = subset(x, 10, seed=3)
    assert len(s) == 10 and len(set(s.tolist())) == 10 and torch.equal(s, s.sort().values)
    assert torch.equal(s, subset(x, 10, seed=3)) and not torch.equal(s, subset(x, 10, seed=4))
    assert subset(x, None) is x
    with pytest.raises(ValueError):
        subset(x, 101)
