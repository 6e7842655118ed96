"""The one shape every backbone takes: a chain of named *units*, then a *head*.

A unit is the smallest piece that can be removed with the shapes still fitting (a residual
block, an MBConv block, a conv+ReLU in VGG). Stages group units for freezing. Pruning
methods, Grad-CAM and the layer-importance rebuild work on this shape only, so the unit
boundaries of each architecture are described once, in its builder.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import torch
from torch import nn


class ClassifierHead(nn.Sequential):
    """Global average pooling, dropout and a linear classifier (the head of Kim (ResNet transfer learning))."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.3):
        super().__init__(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_features, num_classes)
        )


class Net(nn.Module):
    """A backbone as ``features`` (an ``nn.Sequential`` of named units) followed by ``head``.

    Args:
        units: ``(name, module)`` pairs in forward order; the first is the stem.
        head: maps the last feature map to class logits.
        stages: unit names grouped into stages, in order (used by ``freeze``).
        arch: the architecture's name, recorded for checks (e.g. a baseline checkpoint).
    """

    def __init__(self, units: Iterable[tuple[str, nn.Module]], head: nn.Module,
                 stages: list[list[str]], arch: str, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(OrderedDict(units))
        self.head = head
        self.stages = [list(s) for s in stages]
        self.arch = arch
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def unit_names(self) -> list[str]:
        return list(self.features._modules)

    def freeze(self, n_stages: int) -> None:
        """Freeze the leading ``n_stages`` stages (negative: all but the last ``-n``)."""
        names = {u for stage in self.stages[:n_stages] for u in stage} if n_stages else set()
        for name, unit in self.features.named_children():
            for p in unit.parameters():
                p.requires_grad_(name not in names)

    def cam_layer(self) -> nn.Module:
        """Grad-CAM target: the last unit that is not an identity (the last conv stage)."""
        for unit in reversed(list(self.features)):
            if not isinstance(unit, nn.Identity):
                return unit
        raise ValueError("net has no feature unit")


def seq(*modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(*modules)
