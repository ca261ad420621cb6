"""Image DataModules: ``data=cifar10``, ``data=celeba``, ``data=digits`` (and synthetic ``data=random_images``).

Ends: noise N(0, I) of the image shape (C, H, W) and the data set's training split as one float tensor in
[-1, 1] (an :class:`~flowmatch.distributions.Empirical`, optionally flipped left-right with probability 1/2,
``hflip``). ``subset`` keeps that many training images, drawn by ``seed``. Validation/test pairs join the
held-out split (CIFAR-10: the test split for both; CelebA: ``valid`` / ``test``; digits: a seeded held-out
part of ``holdout`` images for both) with fresh noise, independently (re-paired by exact OT when the coupling
is ``ot``); at most ``val_size`` / ``test_size`` images, drawn by ``seed``.

``device``: where the training tensor lives during ``fit``. ``cpu`` (default) keeps it in host memory (a
batch is gathered on the CPU and copied each step). ``auto`` moves it to the trainer's GPU when it takes
less than ``max_gpu_fraction`` of the free GPU memory, ``cuda`` always when the trainer runs on a GPU.
Then batches are gathered and noise is drawn on the GPU (indices and flips still come from the CPU
generator, so the stream is seeded; noise draws differ from a CPU run). Evaluation always uses CPU copies.
Missing files stop at build time with the loaders' :class:`~flowmatch.data.images.DatasetNotFoundError`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from flowmatch.data import images as I
from flowmatch.data.base import FlowDataModule
from flowmatch.direction import apply_direction
from flowmatch.distributions import Empirical, StandardNormal
from flowmatch.evaluation import EvalSetup
from flowmatch.streams import generator

__all__ = ["ImageDataModule", "CIFAR10DataModule", "CelebADataModule", "DigitsDataModule", "RandomImageDataModule"]


class ImageDataModule(FlowDataModule):
    """Base of the image modules; subclasses implement ``load(split)`` for "train", "val", "test"."""

    def __init__(
        self,
        coupling,
        channels: int = 3,
        image_size: int = 32,
        dim: int | None = None,
        root: str = "data",
        download: bool = False,
        verify_checksums: bool = True,
        subset: int | None = None,
        hflip: bool = False,
        device: str = "cpu",
        max_gpu_fraction: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(coupling, **kwargs)
        self.channels, self.image_size = int(channels), int(image_size)
        expected = self.channels * self.image_size**2
        if dim is not None and int(dim) != expected:
            raise ValueError(f"data.dim={dim} must equal data.channels * data.image_size^2 = {expected}")
        if device not in ("cpu", "auto", "cuda"):
            raise ValueError(f"data.device must be one of ['cpu', 'auto', 'cuda'], got {device!r}")
        self.dim, self.shape = expected, (self.channels, self.image_size, self.image_size)
        self.root, self.download, self.verify_checksums = str(root), bool(download), bool(verify_checksums)
        self.subset, self.hflip = (None if subset is None else int(subset)), bool(hflip)
        self.device_opt, self.max_gpu_fraction = device, float(max_gpu_fraction)
        self.train_data: Tensor | None = None
        self._held: dict[str, Tensor] = {}
        self._cpu_ends = None
        self.data_device = torch.device("cpu")

    def load(self, split: str) -> Tensor:
        raise NotImplementedError

    def _checked(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"{type(self).__name__}: images have shape {tuple(x.shape[1:])} but the config says "
                f"(data.channels, data.image_size, data.image_size) = {self.shape}"
            )
        return x

    def build_ends(self):
        self.train_data = self._checked(I.subset(self.load("train"), self.subset, self.seed))
        return StandardNormal(self.shape), Empirical(self.train_data, hflip=self.hflip)

    def setup(self, stage: str | None = None) -> None:
        if self.p0 is None:
            super().setup(stage)
            self._cpu_ends = (self.p0, self.p1)
        device = self._target_device()
        if device is not None and device != self.data_device:
            data = Empirical(self.train_data.to(device), hflip=self.hflip)
            self.p0, self.p1 = apply_direction(StandardNormal(self.shape, device), data, self.direction)
            self.coupling.setup(self.p0, self.p1)  # finite pair sets are kept as they are
            self.data_device = device

    def _target_device(self) -> torch.device | None:
        if self.device_opt == "cpu" or self.trainer is None:
            return None
        device = self.trainer.strategy.root_device
        if device.type != "cuda":
            return None
        if self.device_opt == "auto":
            free, _ = torch.cuda.mem_get_info(device)
            need = self.train_data.numel() * self.train_data.element_size()
            if need > self.max_gpu_fraction * free:
                warnings.warn(
                    f"data.device=auto: the training images ({need / 2**30:.1f} GiB) stay on the CPU "
                    f"(more than {self.max_gpu_fraction} of the free GPU memory)",
                    stacklevel=2,
                )
                return None
        return device

    def held_out(self, split: str) -> Tensor:
        """The held-out split ("val" or "test") as a CPU tensor (loaded once)."""
        if split not in self._held:
            self._held[split] = self._checked(self.load(split))
        return self._held[split]

    def held_out_pairs(self, n: int, g: torch.Generator, split: str):
        """At most ``n`` images of the held-out ``split`` (without replacement) and as many noise draws, put at
        t = 0 / t = 1 by the direction and paired by the coupling's rule (:meth:`Coupling.pair`)."""
        data = self.held_out(split)
        data = data[torch.randperm(len(data), generator=g)[:n]]
        noise = StandardNormal(self.shape).sample(len(data), g)
        return self.coupling.pair(*apply_direction(noise, data, self.direction))

    def eval_setup(self) -> EvalSetup:
        """CPU ends and, when the images are the target (forward), the training and held-out images."""
        self.setup()
        forward = self.direction == "forward"
        return EvalSetup.from_ends(
            *self._cpu_ends,
            self.coupling,
            train_data=self.train_data if forward else None,
            test_data=(lambda: self.held_out("test")) if forward else None,
        )


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (3 x 32 x 32): 50,000 training images; val and test use the 10,000-image test split."""

    def __init__(self, coupling, channels: int = 3, image_size: int = 32, **kwargs) -> None:
        super().__init__(coupling, channels=channels, image_size=image_size, **kwargs)

    def load(self, split: str) -> Tensor:
        return I.load_cifar10(
            self.root,
            "train" if split == "train" else "test",
            download=self.download,
            verify_checksums=self.verify_checksums,
        )


class CelebADataModule(ImageDataModule):
    """Aligned CelebA faces, center-cropped to ``crop`` and resized to ``image_size`` (default 140 -> 64).

    Splits: train, valid (val), test; ``subset`` is drawn before decoding; held-out splits decode at most
    ``val_size`` / ``test_size`` images. ``num_workers``: JPEG decoding threads (None: up to 8).
    """

    SPLITS = {"train": "train", "val": "valid", "test": "test"}

    def __init__(
        self,
        coupling,
        channels: int = 3,
        image_size: int = 64,
        crop: int | None = 140,
        num_workers: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(coupling, channels=channels, image_size=image_size, **kwargs)
        if self.channels != 3:
            raise ValueError(f"data.channels must be 3 for CelebA, got {channels}")
        self.crop, self.num_workers = (None if crop is None else int(crop)), num_workers

    def _load(self, split: str, n: int | None, seed: int) -> Tensor:
        return I.load_celeba(
            self.root,
            self.SPLITS[split],
            crop=self.crop,
            size=self.image_size,
            download=self.download,
            verify_checksums=self.verify_checksums,
            subset=n,
            seed=seed,
            num_workers=self.num_workers,
        )

    def load(self, split: str) -> Tensor:
        if split == "train":
            return self._load(split, None, self.seed)
        n = self.val_size if split == "val" else self.test_size
        try:
            return self._load(split, n, self.seed)
        except ValueError as exc:  # the split has fewer than n images: take them all
            if "subset must be in" not in str(exc):
                raise
            return self._load(split, None, self.seed)

    def build_ends(self):  # draw the subset before decoding
        self.train_data = self._checked(self._load("train", self.subset, self.seed))
        return StandardNormal(self.shape), Empirical(self.train_data, hflip=self.hflip)


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 1,797 8x8 digits (1 channel; ``upsample`` x nearest), offline. ``holdout`` images,
    drawn by ``seed``, are held out for val and test; the rest is the training split."""

    def __init__(
        self, coupling, channels: int = 1, image_size: int = 8, upsample: int = 1, holdout: int = 297, **kwargs
    ) -> None:
        super().__init__(coupling, channels=channels, image_size=image_size, **kwargs)
        self.upsample, self.holdout = int(upsample), int(holdout)
        if not 1 <= self.holdout < 1797:
            raise ValueError(f"data.holdout must be in 1..1796, got {holdout}")

    def load(self, split: str) -> Tensor:
        x = I.load_digits(upsample=self.upsample)
        perm = torch.randperm(len(x), generator=generator(self.seed, "data"))
        idx = perm[self.holdout :] if split == "train" else perm[: self.holdout]
        return x[idx.sort().values]


class RandomImageDataModule(ImageDataModule):
    """SYNTHETIC: ``n_images`` uniform random images in [-1, 1] of shape (channels, image_size, image_size),
    drawn by ``seed`` (a stand-in with CIFAR-10's shape for throughput checks; nothing to learn)."""

    def __init__(self, coupling, channels: int = 3, image_size: int = 32, n_images: int = 10_000, **kwargs) -> None:
        super().__init__(coupling, channels=channels, image_size=image_size, **kwargs)
        self.n_images = int(n_images)

    def load(self, split: str) -> Tensor:
        held = self.val_size if split == "val" else self.test_size
        n = self.n_images if split == "train" else max(2, min(self.n_images, held))
        g = generator(self.seed + {"train": 0, "val": 1, "test": 2}[split], "data")
        return torch.rand(n, *self.shape, generator=g) * 2 - 1
