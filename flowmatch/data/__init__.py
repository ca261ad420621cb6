"""LightningDataModules serving coupled pairs (x0, x1): ``gaussian``/``gmm`` and image data sets."""
from flowmatch.data.base import FlowDataModule, PairStream
from flowmatch.data.gaussian import GaussianDataModule

__all__ = ["FlowDataModule", "PairStream", "GaussianDataModule"]
