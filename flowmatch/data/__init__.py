"""LightningDataModules serving coupled pairs (x0, x1): ``gaussian``/``gmm``, image data sets and a folder of images."""

from flowmatch.data.base import FlowDataModule, PairStream
from flowmatch.data.gaussian import GaussianDataModule
from flowmatch.data.image_folder import ImageFolderDataModule
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
    "ImageFolderDataModule",
    "RandomImageDataModule",
]
