"""Data: one DataModule over several sources, and the preparation scripts used by DVC stages."""

from prunegrid.data.datamodule import ImageDataModule

__all__ = ["ImageDataModule"]
