"""YOLOv5 (v6.0/v7.0 architecture) as a prunegrid :class:`~prunegrid.models.net.Net`.

The layer list below is the one every published YOLOv5 model definition shares (``yolov5n.yaml``
to ``yolov5x.yaml`` differ only in ``depth_multiple``, ``width_multiple`` and, for P6 models,
anchors): a CSP-Darknet backbone of Conv and C3 blocks ending in SPPF, a PANet neck, and a
Detect head on strides 8, 16 and 32. ``conf/backbone/yolov5n.yaml`` and ``yolov5m.yaml`` give the
multiples and anchors; a new size is one YAML. Module and attribute names follow the original
(``conv``/``bn``/``act``, ``cv1``/``cv2``/``cv3``/``m``), so an original state dict maps onto this
model by renaming ``model.<i>`` to ``features.<i>`` (``head`` for the Detect layer).

The forward pass is a graph, not a chain: Concat layers read earlier outputs (``froms``). Units
are the 24 numbered layers; none can be removed without breaking the graph, so methods that
remove units refuse a detector. FX INT8 quantization refuses it too: it quantizes ``features`` and
``head`` as two FX graphs of a chain, and here the layers read earlier outputs (each refusal in one
line, from the contract).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prunegrid.errors import ConfigError
from prunegrid.models.net import FX, LOGITS, Contract, Net, Unit

# [from, repeats, module, args] of YOLOv5 v6.0+ (P3-P5 outputs), as in the published YAMLs.
BACKBONE: list[list[Any]] = [
    [-1, 1, "Conv", [64, 6, 2, 2]],  # 0-P1/2
    [-1, 1, "Conv", [128, 3, 2]],  # 1-P2/4
    [-1, 3, "C3", [128]],
    [-1, 1, "Conv", [256, 3, 2]],  # 3-P3/8
    [-1, 6, "C3", [256]],
    [-1, 1, "Conv", [512, 3, 2]],  # 5-P4/16
    [-1, 9, "C3", [512]],
    [-1, 1, "Conv", [1024, 3, 2]],  # 7-P5/32
    [-1, 3, "C3", [1024]],
    [-1, 1, "SPPF", [1024, 5]],  # 9
]
HEAD: list[list[Any]] = [
    [-1, 1, "Conv", [512, 1, 1]],
    [-1, 1, "Upsample", [None, 2, "nearest"]],
    [[-1, 6], 1, "Concat", [1]],  # cat backbone P4
    [-1, 3, "C3", [512, False]],  # 13
    [-1, 1, "Conv", [256, 1, 1]],
    [-1, 1, "Upsample", [None, 2, "nearest"]],
    [[-1, 4], 1, "Concat", [1]],  # cat backbone P3
    [-1, 3, "C3", [256, False]],  # 17 (P3/8-small)
    [-1, 1, "Conv", [256, 3, 2]],
    [[-1, 14], 1, "Concat", [1]],  # cat head P4
    [-1, 3, "C3", [512, False]],  # 20 (P4/16-medium)
    [-1, 1, "Conv", [512, 3, 2]],
    [[-1, 10], 1, "Concat", [1]],  # cat head P5
    [-1, 3, "C3", [1024, False]],  # 23 (P5/32-large)
]
DETECT_FROM = (17, 20, 23)
ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
BACKBONE_LAYERS = len(BACKBONE)


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + SiLU, padded to keep the size at stride 1."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)  # YOLOv5's initialize_weights
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    """CSP bottleneck with 3 convolutions."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools of size ``k``."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """YOLOv5's Detect head: a 1x1 conv per level to ``na * (5 + nc)`` outputs.

    Training mode returns the raw maps ``(B, na, ny, nx, 5 + nc)`` per level (the loss reads
    them); eval mode returns the decoded predictions ``(B, N, 5 + nc)``: box centre, width and
    height in input pixels, objectness and class probabilities (and the raw maps too with
    ``raw=True``, for a validation loss).
    """

    def __init__(self, nc: int, anchors: Sequence[Sequence[float]], ch: Sequence[int]):
        super().__init__()
        self.nc, self.no, self.nl = nc, nc + 5, len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.register_buffer("stride", torch.ones(self.nl))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)

    def forward(self, xs: list[torch.Tensor], raw: bool = False):
        out, z = [], []
        for i in range(self.nl):
            x = self.m[i](xs[i])
            bs, _, ny, nx = x.shape
            x = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            out.append(x)
            if not self.training:
                grid, anchor_grid = self._grid(nx, ny, i, x)
                xy, wh, conf = x.sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + grid) * self.stride[i]
                wh = (wh * 2) ** 2 * anchor_grid
                z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        if self.training:
            return out
        pred = torch.cat(z, 1)
        return (pred, out) if raw else pred

    def _grid(self, nx: int, ny: int, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = 1, self.na, ny, nx, 2
        y, xx = torch.arange(ny, device=x.device, dtype=x.dtype), torch.arange(nx, device=x.device, dtype=x.dtype)
        yv, xv = torch.meshgrid(y, xx, indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid

    def initialize_biases(self) -> None:
        """YOLOv5's prior: about 8 objects per 640 px image, class probability 0.6 / nc."""
        for mi, s in zip(self.m, self.stride):
            b = mi.bias.view(self.na, -1)
            b.data[:, 4] += math.log(8 / (640 / float(s)) ** 2)
            b.data[:, 5:5 + self.nc] += math.log(0.6 / (self.nc - 0.99999))


MODULES = {"Conv": Conv, "C3": C3, "SPPF": SPPF, "Concat": Concat, "Upsample": nn.Upsample}


def make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def parse(layers: list[list[Any]], depth_multiple: float, width_multiple: float,
          ch: int = 3) -> tuple[list[nn.Module], list[int | list[int]], list[int]]:
    """Modules, inputs (``from``) and output channels of each layer, as YOLOv5's ``parse_model``."""
    modules, froms, chs = [], [], []
    for i, (f, n, name, args) in enumerate(layers):
        kind = MODULES[name]
        n = max(round(n * depth_multiple), 1) if n > 1 else n
        c_in = lambda j: ch if not chs and j == -1 else chs[j]
        if kind in (Conv, C3, SPPF):
            c1, c2 = c_in(f), make_divisible(args[0] * width_multiple, 8)
            args = [c1, c2, *args[1:]]
            if kind is C3:
                args.insert(2, n)
                n = 1
        elif kind is Concat:
            c2 = sum(c_in(x) for x in f)
        else:
            c2 = c_in(f)
        m = nn.Sequential(*(kind(*args) for _ in range(n))) if n > 1 else kind(*args)
        modules.append(m)
        froms.append(f)
        chs.append(c2)
    return modules, froms, chs


class YoloNet(Net):
    """A YOLOv5 detector: ``features`` are the numbered layers, ``head`` the Detect layer.

    ``forward(x)`` returns Detect's output (raw maps in training, decoded predictions in eval);
    ``forward(x, raw=True)`` in eval returns both.
    """

    def __init__(self, arch: str, num_classes: int, depth_multiple: float, width_multiple: float,
                 anchors: Sequence[Sequence[float]] = ANCHORS, input_size: int | None = None):
        layers, froms, chs = parse(BACKBONE + HEAD, depth_multiple, width_multiple)
        detect = Detect(num_classes, anchors, [chs[j] for j in DETECT_FROM])
        super().__init__([(str(i), m) for i, m in enumerate(layers)], detect, None, arch, num_classes)
        self.froms = froms
        self.keep = sorted({j for f in froms if isinstance(f, list) for j in f if j != -1} | set(DETECT_FROM))
        self._init_stride()
        if input_size is not None:
            self.declare(input_size)

    def _init_stride(self) -> None:
        s = 256
        was = self.training
        self.train()
        with torch.no_grad():
            out = self.forward(torch.zeros(1, 3, s, s))
        self.train(was)
        self.head.stride.copy_(torch.tensor([s / x.shape[-2] for x in out]))
        self.head.anchors /= self.head.stride.view(-1, 1, 1)
        self.head.initialize_biases()

    def forward(self, x: torch.Tensor, raw: bool = False):
        saved: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.features):
            f = self.froms[i]
            if f != -1:
                x = [x if j == -1 else saved[j] for j in f] if isinstance(f, list) else saved[f]
            x = layer(x)
            if i in self.keep:
                saved[i] = x
        return self.head([saved[j] for j in DETECT_FROM], raw=raw)

    @torch.no_grad()
    def declare(self, input_size: int) -> Contract:
        """The contract at ``input_size``: every layer's shapes (a Concat's first input as its
        input shape), stages by output resolution; no unit is removable."""
        if input_size % 32:
            raise ConfigError(f"dataset.input_size={input_size} must be a multiple of 32 for {self.arch} "
                              "(its largest stride)")
        shapes: dict[str, tuple] = {}

        def record(name: str):
            def hook(_module, inputs, output) -> None:
                first = inputs[0][0] if isinstance(inputs[0], list) else inputs[0]
                shapes.setdefault(name, (tuple(first.shape[1:]), tuple(output.shape[1:])))
            return hook

        hooks = [u.register_forward_hook(record(n)) for n, u in self.features.named_children()]
        was = self.training
        self.eval()
        p = next(self.parameters())
        try:
            self.forward(torch.zeros(1, 3, input_size, input_size, device=p.device))
        finally:
            for h in hooks:
                h.remove()
            self.train(was)
        names = self.unit_names()
        self.stages = []
        for n in names:
            if not self.stages or shapes[n][1][1:] != shapes[self.stages[-1][-1]][1][1:]:
                self.stages.append([])
            self.stages[-1].append(n)
        stage_of = {n: i for i, s in enumerate(self.stages) for n in s}
        units = tuple(Unit(n, stage_of[n], *shapes[n], removable=False) for n in names)
        self.contract = Contract(input_size, units, tuple(tuple(s) for s in self.stages), self._protected(),
                                 f"features.{BACKBONE_LAYERS - 1}", self._capabilities(units))
        return self.contract

    def _protected(self) -> tuple[str, ...]:
        """Detect's output convolutions: their channels are the anchors' boxes and classes."""
        return tuple(f"head.m.{i}" for i in range(self.head.nl))

    def _capabilities(self, units: tuple[Unit, ...]) -> frozenset[str]:
        """A Net's capabilities without ``fx`` (``features`` is a graph, not the chain FX INT8
        quantizes on its own) and ``logits`` (Detect outputs boxes, not class logits)."""
        return frozenset(super()._capabilities(units) - {FX, LOGITS})


def yolov5(num_classes: int, input_size: int, arch: str = "yolov5n", depth_multiple: float = 0.33,
           width_multiple: float = 0.25, anchors: Sequence[Sequence[float]] = ANCHORS, pretrained: bool = False,
           weights_path: str | None = None, min_input_size: int = 32, **_: Any) -> YoloNet:
    """Build a YOLOv5 detector for ``num_classes`` at ``input_size`` (a multiple of 32).

    ``weights_path``: a local state dict (a prunegrid ``YoloNet``'s, or an original YOLOv5
    model's ``model.<i>`` keys); ``pretrained=true`` loads the original release through
    ``torch.hub`` (needs internet and the ``yolov5`` repository's code).
    """
    if input_size < min_input_size:
        raise ConfigError(f"dataset.input_size={input_size} is too small for backbone {arch} "
                          f"(minimum {min_input_size}); set dataset.input_size={min_input_size} or more")
    net = YoloNet(arch, num_classes, depth_multiple, width_multiple, [list(map(float, a)) for a in anchors])
    state = None
    if weights_path:
        from prunegrid.models.backbones import _read_state

        state = _read_state(weights_path)
    elif pretrained:
        try:
            state = torch.hub.load("ultralytics/yolov5", arch, pretrained=True, autoshape=False).state_dict()
        except Exception as exc:  # offline: URLError, OSError, hub errors
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise ConfigError(f"cannot fetch pretrained {arch} weights ({type(exc).__name__}: {reason}); run with "
                              "backbone.pretrained=false, or set backbone.weights_path=FILE (a local state dict)") from exc
    if state is not None:
        _load_original(net, state, weights_path or arch)
    net.declare(input_size)
    net.train()
    return net


def _load_original(net: YoloNet, state: dict, source: str) -> None:
    """Load a state dict of this model or of the original (``model.<i>.``, Detect at ``model.24.``);
    a Detect layer sized for other classes (80 on COCO) is left as initialised."""
    last = len(net.features)
    renamed = {}
    for k, v in state.items():
        k = k.removeprefix("model.") if k.startswith("model.") and not k.startswith("model.model.") else k
        k = k.removeprefix("model.model.") if k.startswith("model.model.") else k
        head = k.split(".", 1)
        if head[0].isdigit():
            k = f"head.{head[1]}" if int(head[0]) == last else f"features.{k}"
        renamed[k] = v
    own = net.state_dict()
    fits = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k.startswith("features.") and k not in fits]
    if missing:
        raise ConfigError(f"weights {source} do not fit {net.arch}: {len(missing)} feature tensors missing or "
                          f"of another shape (first: {missing[0]})")
    net.load_state_dict(fits, strict=False)
