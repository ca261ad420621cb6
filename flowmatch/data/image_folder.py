"""``data=image_folder``: the images of a folder of your own as the data end.

Every file under ``root`` (searched recursively, so torchvision's ImageFolder layout ``root/<class>/<file>`` and a
flat folder both work; class folders are ignored) whose extension is one of :data:`EXTENSIONS` is one image. Each
is decoded with PIL, converted to RGB (``channels: 3``) or greyscale (``channels: 1``), centre-cropped to a square
and resized to ``image_size`` x ``image_size`` (bicubic), then scaled to [-1, 1] like the other image modules
(pixel ``p`` -> ``p / 127.5 - 1``). A fraction ``holdout_fraction`` of the images (at least one), drawn by
``seed``, is held out for the val/test pairs; the rest is the training split. A missing, empty or image-less
``root`` stops with one :class:`~flowmatch.data.images.DatasetNotFoundError` line naming ``data.root`` and its
value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from flowmatch.data.image_modules import ImageDataModule
from flowmatch.data.images import DatasetNotFoundError, to_unit_range
from flowmatch.streams import generator

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MODES = {1: "L", 3: "RGB"}


def image_files(root: str | Path) -> list[Path]:
    """The image files under ``root`` (recursive, by extension, case-insensitive), sorted by path. Raises
    DatasetNotFoundError when ``root`` is not a folder or holds no image."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"data.root={str(root)!r} is not a folder: set data.root=<a folder of images> "
            f"(files {', '.join(EXTENSIONS)}, searched recursively)"
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise DatasetNotFoundError(
            f"data.root={str(root)!r} holds no images: expected files {', '.join(EXTENSIONS)} in it or in its "
            "sub-folders"
        )
    return files


def load_image(path: Path, channels: int, size: int) -> Tensor:
    """One image file as float32 (channels, size, size) in [-1, 1]: converted, centre-cropped, resized."""
    try:
        with Image.open(path) as img:
            img = ImageOps.fit(img.convert(MODES[channels]), (size, size), method=Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"data.root: {str(path)!r} is not a readable image ({exc})") from exc
    pixels = np.asarray(img, dtype=np.uint8).reshape(size, size, channels)
    return to_unit_range(torch.from_numpy(pixels.copy()).permute(2, 0, 1))


class ImageFolderDataModule(ImageDataModule):
    """Images of a folder (module docstring) against N(0, I); ``holdout_fraction``: the share held out for val/test."""

    def __init__(
        self, coupling, root: str, channels: int = 3, image_size: int = 32, holdout_fraction: float = 0.1, **kwargs
    ):
        super().__init__(coupling, channels=channels, image_size=image_size, root=root, **kwargs)
        if self.channels not in MODES:
            raise ValueError(f"data.channels must be one of {list(MODES)} for data=image_folder, got {channels}")
        if not 0.0 < float(holdout_fraction) < 1.0:
            raise ValueError(f"data.holdout_fraction must be a number in (0, 1), got {holdout_fraction}")
        self.files = image_files(root)
        if len(self.files) < 2:
            raise DatasetNotFoundError(
                f"data.root={str(root)!r} holds {len(self.files)} image: at least 2 are needed (one held out)"
            )
        self.holdout = max(1, min(len(self.files) - 1, round(float(holdout_fraction) * len(self.files))))
        self._all: Tensor | None = None

    def load(self, split: str) -> Tensor:
        """The training images, or the held-out ones for "val" and "test" (decoded once)."""
        if self._all is None:
            self._all = torch.stack([load_image(p, self.channels, self.image_size) for p in self.files])
        perm = torch.randperm(len(self._all), generator=generator(self.seed, "data"))
        idx = perm[self.holdout :] if split == "train" else perm[: self.holdout]
        return self._all[idx.sort().values]
