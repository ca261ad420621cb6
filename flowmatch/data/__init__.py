"""LightningDataModules serving coupled pairs (x0, x1): ``gaussian``/``gmm`` and image data sets."""

from flowmatch.data.base import FlowDataModule, PairStream
from flowmatch.data.gaussian import GaussianDataModule
from flowmatch.data.image_modules import (
    CelebADataModule,
    CIFAR10DataModule,
    DigitsDataModule,
    ImageDataModule,
    RandomImageDataModule,
)

__all__ = [
    "FlowDataModule",
    "PairStream",
    "GaussianDataModule",
    "ImageDataModule",
    "CIFAR10DataModule",
    "CelebADataModule",
    "DigitsDataModule",
    "RandomImageDataModule",
]
