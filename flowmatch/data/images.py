"""Whole image data sets as tensors: CIFAR-10, CelebA (aligned faces) and scikit-learn's 8x8 digits.

Every loader returns **one float32 tensor of shape (N, C, H, W) with values in [-1, 1]** (pixel ``p`` in
0..255 becomes ``p / 127.5 - 1``; see :func:`to_unit_range`), on the CPU, in the data set's file order (or
in sorted subset order, see :func:`subset`). Labels are not returned. Plain torch + torchvision + sklearn
(no Lightning, no Hydra), so this module can be used from a notebook.

Memory: float32 costs 4 bytes per value; CIFAR-10 train is 0.6 GB, all 202,599 CelebA faces at 64x64 are
10 GB, so for CelebA use ``subset`` (drawn *before* decoding, so only those JPEGs are read).

Checksums: torchvision checks the md5 of every CIFAR-10 batch file and of ``batches.meta``, and of CelebA's
five text files. ``verify_checksums=False`` loads through a subclass whose md5 entries are cleared
(``None``), so torchvision then only checks that the files exist. Use it for a copy of your own (re-packed
files) or for fabricated test files.

Missing data: every loader stops at once with one :class:`DatasetNotFoundError` (a ``FileNotFoundError``)
that names the expected layout under ``root`` and how to get the data; with ``download=True`` and no
network (or no ``gdown`` for CelebA) the same error is raised, chained to the original cause. Files that are
present but fail an md5 check raise :class:`DatasetIntegrityError`, a subclass of it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.datasets import CIFAR10, CelebA
from torchvision.datasets.utils import check_integrity

from flowmatch.streams import generator

__all__ = [
    "DatasetNotFoundError",
    "DatasetIntegrityError",
    "to_unit_range",
    "subset",
    "subset_indices",
    "load_cifar10",
    "load_celeba",
    "load_digits",
    "CIFAR10_LAYOUT",
    "CELEBA_LAYOUT",
]


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not under ``root`` (and could not be downloaded)."""


class DatasetIntegrityError(DatasetNotFoundError):
    """The files are present but an md5 check failed (pass ``verify_checksums=False`` to skip it)."""


CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
CELEBA_TEXT_FILES = [
    "list_eval_partition.txt",
    "identity_CelebA.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
    "list_attr_celeba.txt",
]
CIFAR10_LAYOUT = "<root>/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch, batches.meta}"
CELEBA_LAYOUT = "<root>/celeba/img_align_celeba/*.jpg (000001.jpg ...), and in <root>/celeba/: " + ", ".join(
    CELEBA_TEXT_FILES
)


def to_unit_range(x: Tensor | np.ndarray) -> Tensor:
    """uint8 pixels (0..255) -> float32 in [-1, 1] (``p / 127.5 - 1``); 0 -> -1 and 255 -> 1 exactly."""
    x = torch.as_tensor(x)
    return x.float().div_(127.5).sub_(1.0)


def subset_indices(n_total: int, n: int | None, seed: int = 0) -> Tensor:
    """``n`` distinct indices of ``range(n_total)`` drawn by ``seed`` (sorted); all indices when ``n`` is None."""
    if n is None:
        return torch.arange(n_total)
    n = int(n)
    if not 0 < n <= n_total:
        raise ValueError(f"subset must be in 1..{n_total} (the number of images), got {n}")
    return torch.randperm(n_total, generator=generator(int(seed), "data"))[:n].sort().values


def subset(x: Tensor, n: int | None, seed: int = 0) -> Tensor:
    """``n`` items of ``x`` (along dim 0) drawn without replacement by ``seed``, kept in their original order.

    ``n=None`` returns ``x``. ``load_celeba(..., subset=n, seed=s)`` equals ``subset(load_celeba(...), n, s)``.
    """
    if n is None:
        return x
    return x[subset_indices(len(x), n, seed)]


# --------------------------------------------------------------------------------------------------- errors


def _missing(folder: Path, names: list[str]) -> list[str]:
    return [n for n in names if not (folder / n).exists()]


def _not_found(name: str, root: Path, layout: str, missing: list[str], how: str, cause: BaseException | None):
    msg = f"{name} not found under root={str(root)!r}"
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        msg += f" (missing: {shown})"
    if cause is not None:
        msg += f"; download failed: {type(cause).__name__}: {str(cause).rstrip('.')}"
    msg += f".\nExpected layout: {layout}.\nTo get it: {how}"
    return DatasetNotFoundError(msg)


def _integrity(name: str, root: Path, bad: list[str]) -> DatasetIntegrityError:
    return DatasetIntegrityError(
        f"{name} under root={str(root)!r}: md5 check failed for {', '.join(bad)}. If this is a copy of your "
        "own (re-packed files), load it with verify_checksums=False (config: data.verify_checksums=false); "
        "otherwise delete the files and download again."
    )


def _build(cls, name, root: Path, folder: Path, required, md5s: dict, layout, how, verify, download, **kw):
    """Construct torchvision dataset ``cls``; turn missing files / failed downloads into one clear error."""
    if not download:
        missing = _missing(folder, required)
        if missing:  # stop at once, before torchvision says "not found or corrupted"
            raise _not_found(name, root, layout, missing, how, None)
    try:
        return cls(str(root), download=download, **kw)
    except Exception as e:  # URLError/OSError (no network), RuntimeError (gdown, md5, not found) ...
        missing = _missing(folder, required)
        if missing:
            raise _not_found(name, root, layout, missing, how, e if download else None) from e
        bad = [n for n, m in md5s.items() if verify and m is not None and not check_integrity(str(folder / n), m)]
        if bad:
            raise _integrity(name, root, bad) from e
        raise


# -------------------------------------------------------------------------------------------------- CIFAR-10


class _CIFAR10NoChecksum(CIFAR10):
    """CIFAR10 with the md5 entries cleared: torchvision's ``check_integrity(path, None)`` only checks existence."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def load_cifar10(root, split: str = "train", download: bool = False, verify_checksums: bool = True) -> Tensor:
    """CIFAR-10 ``split`` ("train": 50,000 images, "test": 10,000) as float32 (N, 3, 32, 32) in [-1, 1].

    Reads the uint8 array ``dataset.data`` (N, 32, 32, 3) directly (no per-image PIL round trip).
    torchvision requires all seven files of the layout for either split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for CIFAR-10, got {split!r}")
    root = Path(root).expanduser()
    cls = CIFAR10 if verify_checksums else _CIFAR10NoChecksum
    md5s = {n: m for n, m in CIFAR10.train_list + CIFAR10.test_list}
    md5s[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
    how = (
        "pass download=True (config: data.download=true) on a machine with network access, or copy/extract "
        "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that this layout exists."
    )
    ds = _build(
        cls,
        "CIFAR-10",
        root,
        root / CIFAR10.base_folder,
        CIFAR10_FILES,
        md5s,
        CIFAR10_LAYOUT,
        how,
        verify_checksums,
        download,
        train=(split == "train"),
    )
    return to_unit_range(torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous())


# ---------------------------------------------------------------------------------------------------- CelebA


class _CelebANoChecksum(CelebA):
    """CelebA with the md5 entries of ``file_list`` cleared (``_check_integrity`` then checks existence only)."""

    file_list = [(file_id, None, name) for file_id, _, name in CelebA.file_list]


def _decode_face(path: str, crop: int | None, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        c = min(w, h) if crop is None else int(crop)
        if c > min(w, h):
            raise ValueError(f"crop={c} is larger than the image {path} ({w}x{h})")
        # Same offsets as torchvision.transforms.functional.center_crop.
        left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))
        im = im.crop((left, top, left + c, top + c))
        if c != size:
            im = im.resize((size, size), resample=Image.BILINEAR)  # PIL bilinear filters (antialiased) when shrinking
        return np.asarray(im, dtype=np.uint8)


def load_celeba(
    root,
    split: str = "train",
    crop: int | None = 140,
    size: int = 64,
    download: bool = False,
    verify_checksums: bool = True,
    subset: int | None = None,
    seed: int = 0,
    num_workers: int | None = None,
) -> Tensor:
    """Aligned CelebA faces of ``split`` ("train", "valid", "test" or "all") as float32 (N, 3, size, size) in [-1, 1].

    Each 178x218 JPEG is center-cropped to ``crop`` x ``crop`` (140 is the common face crop, 178 the largest
    square; None = the largest centered square) and resized to ``size`` x ``size`` with PIL's bilinear filter.
    ``subset`` draws that many images by ``seed`` (see :func:`subset_indices`) from the split *before* decoding.
    JPEGs are decoded in a thread pool of ``num_workers`` threads (default: up to 8, by CPU count).
    """
    splits = ("train", "valid", "test", "all")
    if split not in splits:
        raise ValueError(f"split must be one of {splits} for CelebA, got {split!r}")
    if (crop is not None and int(crop) < 1) or int(size) < 1:
        raise ValueError(f"crop and size must be positive, got crop={crop}, size={size}")
    root = Path(root).expanduser()
    folder = root / CelebA.base_folder
    cls = CelebA if verify_checksums else _CelebANoChecksum
    md5s = {name: md5 for _, md5, name in CelebA.file_list if name in CELEBA_TEXT_FILES}
    how = (
        "pass download=True (config: data.download=true) with network access and `pip install gdown`; Google "
        "Drive often refuses these downloads (quota), so a manual copy works too: get img_align_celeba.zip and "
        "the five text files (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html), unzip the images and arrange "
        "them in this layout."
    )
    ds = _build(
        cls,
        "CelebA",
        root,
        folder,
        ["img_align_celeba"] + CELEBA_TEXT_FILES,
        md5s,
        CELEBA_LAYOUT,
        how,
        verify_checksums,
        download,
        split=split,
        target_type=[],
    )
    names = list(ds.filename)
    if not names:
        raise ValueError(f"CelebA split {split!r} under {str(root)!r} has no images (list_eval_partition.txt)")
    idx = subset_indices(len(names), subset, seed).tolist()
    paths = [str(folder / "img_align_celeba" / names[i]) for i in idx]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise _not_found("CelebA images", root, CELEBA_LAYOUT, [os.path.relpath(p, root) for p in missing], how, None)
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)

    def work(i: int) -> None:
        out[i] = _decode_face(paths[i], crop, size)

    if workers <= 1 or len(paths) == 1:
        for i in range(len(paths)):
            work(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, range(len(paths))))
    return to_unit_range(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous())


# ---------------------------------------------------------------------------------------------------- digits


def load_digits(upsample: int = 1, mode: str = "nearest") -> Tensor:
    """scikit-learn's 1,797 8x8 digits as float32 (1797, 1, 8 * upsample, 8 * upsample) in [-1, 1].

    Values 0..16 map to ``v / 8 - 1``. ``upsample`` is an integer factor; ``mode="nearest"`` (default) repeats
    each pixel in an upsample x upsample block, ``mode="bilinear"`` interpolates (align_corners=False; values
    stay in [-1, 1]). Loads offline from the sklearn package in about a second.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    upsample = int(upsample)
    if upsample < 1:
        raise ValueError(f"upsample must be an integer >= 1, got {upsample}")
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    images = _sk_load_digits().images  # (1797, 8, 8) float64, 0..16
    x = torch.from_numpy(images).float().div_(8.0).sub_(1.0).unsqueeze(1)
    if upsample > 1:
        if mode == "nearest":
            x = x.repeat_interleave(upsample, dim=2).repeat_interleave(upsample, dim=3)
        else:
            x = F.interpolate(x, scale_factor=upsample, mode="bilinear", align_corners=False).clamp_(-1.0, 1.0)
    return x.contiguous()
