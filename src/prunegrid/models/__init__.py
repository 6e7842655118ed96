"""Backbones (plain ``nn.Module``), heads and the LightningModule."""

from prunegrid.models.net import ClassifierHead, Net

__all__ = ["ClassifierHead", "Net"]
