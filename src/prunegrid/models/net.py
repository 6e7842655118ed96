"""The one shape every backbone takes, and the contract it declares.

A backbone is a chain of named *units* (``features``), then a *head*. A unit is the smallest
piece that can be removed with the shapes still fitting (a residual block, an MBConv block, a
conv+ReLU in VGG); stages group units (for freezing). Every builder records, once, what the
methods and explanations may rely on, as a :class:`Contract` (in the spirit of detectron2's
``Backbone.output_shape`` and timm's ``feature_info``): the units in order with their input and
output shapes at the input size and whether each can be removed, the stages, the head, the
layers that must never be pruned, the Grad-CAM layer and the net's capabilities (BatchNorm,
Conv2d, FX-traceable, float weights). Methods read the contract; no method probes shapes or
looks for attributes on the net. :data:`DECLARED` lists every ``Net`` attribute code outside
``prunegrid.models`` may read (a test greps for the rest).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch import nn

BATCHNORM, CONV, FX, FLOAT, REMOVABLE, LOGITS = "batchnorm", "conv", "fx", "float", "removable", "logits"
CAPABILITIES = {
    BATCHNORM: "BatchNorm layers",
    CONV: "Conv2d layers",
    FX: "a graph torch.fx can trace",
    FLOAT: "float weights with gradients",
    REMOVABLE: "units that can be removed without changing shapes",
    LOGITS: "a classifier head whose outputs are class logits (a detector's Detect head is not)",
}


@dataclass(frozen=True)
class Unit:
    """One feature unit: its shapes for one image (``(C, H, W)``) and whether it can be removed."""

    name: str
    stage: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    removable: bool

    @property
    def map_size(self) -> tuple[int, int] | None:
        """Height and width of the unit's output map (``None``: not a spatial map)."""
        return tuple(self.out_shape[1:3]) if len(self.out_shape) == 3 else None


@dataclass(frozen=True)
class Contract:
    """What a :class:`Net` declares at one input size (see the module docstring)."""

    input_size: int
    units: tuple[Unit, ...]
    stages: tuple[tuple[str, ...], ...]
    protected: tuple[str, ...]
    cam_layer: str
    capabilities: frozenset[str]

    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(f"no unit {name}; units: {', '.join(self.names())}")

    def unit_of(self, layer: str) -> str | None:
        """The unit holding a dotted layer name (``features.layer1_0.conv1`` -> ``layer1_0``); None in the head."""
        parts = layer.split(".")
        return parts[1] if len(parts) > 1 and parts[0] == "features" and parts[1] in self.names() else None

    def stage_of(self, unit: str | None) -> int:
        """The stage index of a unit (0 = the first); one past the last stage for the head."""
        for i, names in enumerate(self.stages):
            if unit in names:
                return i
        return len(self.stages)

    def removable(self) -> list[str]:
        return [u.name for u in self.units if u.removable]

    def missing(self, needs: Iterable[str]) -> list[str]:
        """The capabilities in ``needs`` this net lacks."""
        return [n for n in needs if n not in self.capabilities]


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
        stages: unit names grouped into stages, in order (used by ``freeze``); ``None``: consecutive
            units with the same output resolution form a stage (set by :meth:`declare`).
        arch: the architecture's name, recorded for checks (e.g. a baseline checkpoint).
        input_size: when given, the contract is recorded now (:meth:`declare`).
    """

    train_budget: dict | None = None
    contract: Contract | None = None

    def __init__(self, units: Iterable[tuple[str, nn.Module]], head: nn.Module,
                 stages: list[list[str]] | None, arch: str, num_classes: int, input_size: int | None = None):
        super().__init__()
        self.features = nn.Sequential(OrderedDict(units))
        self.head = head
        self.stages = [list(s) for s in stages] if stages is not None else []
        self.arch = arch
        self.num_classes = num_classes
        self.contract: Contract | None = None
        if input_size is not None:
            self.declare(input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def unit_names(self) -> list[str]:
        return list(self.features._modules)

    def unit(self, name: str) -> nn.Module:
        return self.features._modules[name]

    def set_unit(self, name: str, module: nn.Module) -> nn.Module:
        """Put ``module`` in place of unit ``name``; return the unit it replaced (shapes must still fit)."""
        old = self.features._modules[name]
        self.features._modules[name] = module
        return old

    def freeze(self, n_stages: int) -> None:
        """Freeze the leading ``n_stages`` stages (negative: all but the last ``-n``)."""
        names = {u for stage in self.stages[:n_stages] for u in stage} if n_stages else set()
        for name, unit in self.features.named_children():
            for p in unit.parameters():
                p.requires_grad_(name not in names)

    @torch.no_grad()
    def declare(self, input_size: int) -> Contract:
        """Record the contract at ``input_size``: one forward pass reads every unit's shapes.

        Builders call this once; a method that changes the structure (channel pruning, a
        rebuild, INT8) calls it again so the contract stays true. When ``features`` is no longer a
        chain of units (a compiled INT8 graph with the same shapes) only the capabilities are renewed.
        """
        if not isinstance(self.features, nn.Sequential) and self.contract is not None:
            self.contract = replace(self.contract, capabilities=self._capabilities(self.contract.units))
            return self.contract
        shapes: dict[str, tuple] = {}

        def record(name: str):
            def hook(_module, inputs, output) -> None:  # None: the output is left unchanged
                shapes.setdefault(name, (tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))
            return hook

        hooks = [u.register_forward_hook(record(n)) for n, u in self.features.named_children()]
        was = self.training
        self.eval()
        p = next(self.parameters(), None)
        try:
            self.features(torch.zeros(1, 3, input_size, input_size,
                                      device=p.device if p is not None and p.is_floating_point() else "cpu"))
        finally:
            for h in hooks:
                h.remove()
            self.train(was)
        names = self.unit_names()
        if not self.stages:
            for n in names:
                if not self.stages or shapes[n][1][1:] != shapes[self.stages[-1][-1]][1][1:]:
                    self.stages.append([])
                self.stages[-1].append(n)
        stage_of = {n: i for i, s in enumerate(self.stages) for n in s}
        units = tuple(Unit(n, stage_of.get(n, len(self.stages)), *shapes[n],
                           removable=i > 0 and not isinstance(self.unit(n), nn.Identity)
                           and shapes[n][0] == shapes[n][1]) for i, n in enumerate(names))
        self.contract = Contract(input_size, units, tuple(tuple(s) for s in self.stages), self._protected(),
                                 self._cam_layer(units), self._capabilities(units))
        return self.contract

    def _protected(self) -> tuple[str, ...]:
        """The classifier's last Linear (its outputs are the classes)."""
        linears = [f"head.{n}" if n else "head" for n, m in self.head.named_modules() if isinstance(m, nn.Linear)]
        return tuple(linears[-1:])

    def _cam_layer(self, units: tuple[Unit, ...]) -> str:
        """The last unit (not an identity) with a spatial map larger than 1x1, else the last such unit."""
        real = [u for u in units if not isinstance(self.features._modules.get(u.name), nn.Identity)] or list(units)
        for u in reversed(real):
            hw = u.map_size
            if hw and hw[0] * hw[1] > 1:
                return f"features.{u.name}"
        return f"features.{real[-1].name}"

    def _capabilities(self, units: tuple[Unit, ...]) -> frozenset[str]:
        import torch.fx

        mods = list(self.modules())
        caps = {LOGITS}
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine for m in mods):
            caps.add(BATCHNORM)
        if any(isinstance(m, nn.Conv2d) for m in mods):
            caps.add(CONV)
        if isinstance(self.features, nn.Sequential) and any(p.is_floating_point() and p.requires_grad
                                                            for p in self.parameters()):
            caps.add(FLOAT)
        if any(u.removable for u in units):
            caps.add(REMOVABLE)
        try:
            torch.fx.symbolic_trace(self.features)
            torch.fx.symbolic_trace(self.head)
            caps.add(FX)
        except Exception:
            pass
        return frozenset(caps)


DECLARED = frozenset({"features", "head", "stages", "arch", "num_classes", "contract", "train_budget",
                      "unit_names", "unit", "set_unit", "freeze", "declare"})


def seq(*modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(*modules)
