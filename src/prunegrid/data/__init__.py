"""Data: one DataModule over several sources, and the preparation scripts used by DVC stages."""

from prunegrid.data.datamodule import ImageDataModule

__all__ = ["ImageDataModule", "DetectionDataModule", "yolo_folder", "coco_json"]
_DETECTION = ("DetectionDataModule", "yolo_folder", "coco_json")


def __getattr__(name: str):
    """The detection side (:mod:`prunegrid.data.detection`) loads on first use, not with ``prunegrid.data``."""
    if name in _DETECTION:
        from prunegrid.data import detection

        return getattr(detection, name)
    raise AttributeError(f"module 'prunegrid.data' has no attribute '{name}'")
