"""Backbone builders: torchvision / timm models turned into a :class:`~prunegrid.models.net.Net`.

Each builder is the ``_target_`` of a YAML in ``conf/backbone/`` and takes the same options:
``pretrained`` (ImageNet weights through the library's normal download), ``weights_path`` (a
local state dict of the original model, for machines without internet), ``dropout`` of the new
head, and ``freeze`` (leading stages kept frozen; Kim (ResNet transfer learning) freezes all but the last: -1).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable

import torch
import torchvision
from torch import nn

from prunegrid.errors import ConfigError, one_line
from prunegrid.models.net import ClassifierHead, Net, seq


def _read_state(weights_path: str) -> dict:
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"backbone.weights_path={weights_path} does not exist; give a local state dict file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _is_net_state(state: dict) -> bool:
    """A prunegrid :class:`Net` state dict (``paths.weights_out``), not the original library model's."""
    return any(k.startswith("features.") for k in state)


def _load_state(model: nn.Module, arch: str, pretrained: bool, weights_path: str | None,
                fetch: Callable[[], dict]) -> None:
    """Load ImageNet weights from ``weights_path`` or through the library's download.

    A prunegrid ``Net`` state dict (a source task's weights) is loaded later, by :func:`_finish`.
    """
    if weights_path:
        state = _read_state(weights_path)
        if _is_net_state(state):
            return
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"backbone.weights_path={weights_path} does not fit {arch}: {first}") from exc
    elif pretrained:
        try:
            model.load_state_dict(fetch())
        except Exception as exc:  # offline: URLError, OSError, hub errors
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise ConfigError(
                f"cannot fetch ImageNet weights for {arch} ({type(exc).__name__}: {reason}); "
                "run with backbone.pretrained=false, or download them and set backbone.weights_path=FILE"
            ) from exc


def _torchvision(arch: str, pretrained: bool, weights_path: str | None) -> nn.Module:
    model = torchvision.models.get_model(arch, weights=None)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    _load_state(model, arch, pretrained, weights_path, lambda: weights.get_state_dict(progress=True))
    return model


def _load_features(net: Net, weights_path: str | None) -> None:
    """Transfer learning from a source task: the feature units of a saved prunegrid ``Net`` state
    dict (its head, sized for the source classes, is replaced by this net's new head)."""
    if not weights_path:
        return
    state = _read_state(weights_path)
    if not _is_net_state(state):
        return
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    try:
        missing, unexpected = net.load_state_dict(features, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"backbone.weights_path={weights_path} does not fit {net.arch}: "
                          f"{str(exc).splitlines()[0]}") from exc
    missing = [k for k in missing if k.startswith("features.")]
    if missing or unexpected:
        raise ConfigError(f"backbone.weights_path={weights_path} does not fit {net.arch}: "
                          f"{len(missing)} missing, {len(unexpected)} unexpected feature tensors")


def _finish(net: Net, *, input_size: int, min_input_size: int, freeze: int, weights_path: str | None = None) -> Net:
    """Load a source task's feature weights if given, check the input size fits, freeze leading stages
    and record the net's contract (:meth:`Net.declare`) at ``input_size``."""
    _load_features(net, weights_path)
    if input_size < min_input_size:
        raise ConfigError(
            f"dataset.input_size={input_size} is too small for backbone {net.arch} "
            f"(minimum {min_input_size}); set dataset.input_size={min_input_size} or more"
        )
    try:
        net.declare(input_size)
    except RuntimeError as exc:
        raise ConfigError(
            f"dataset.input_size={input_size} is too small for backbone {net.arch}: "
            f"{str(exc).splitlines()[0][:120]}"
        ) from exc
    net.train()
    net.freeze(freeze)
    return net


def resnet(arch: str, num_classes: int, input_size: int, pretrained: bool = False,
           weights_path: str | None = None, dropout: float = 0.3, freeze: int = 0,
           min_input_size: int = 16, block_factory: Callable[[nn.Module, int], nn.Module] | None = None) -> Net:
    """torchvision ResNet: stem (conv1, bn1, relu, maxpool), one unit per residual block.

    ``block_factory(block, stage_index)`` may wrap each block (used by the SE variants).
    """
    m = _torchvision(arch, pretrained, weights_path)
    units = [("stem", seq(m.conv1, m.bn1, m.relu, m.maxpool))]
    stages = [["stem"]]
    for s, layer in enumerate([m.layer1, m.layer2, m.layer3, m.layer4], start=1):
        names = []
        for b, block in enumerate(layer):
            name = f"layer{s}_{b}"
            units.append((name, block_factory(block, s) if block_factory else block))
            names.append(name)
        stages.append(names)
    net = Net(units, ClassifierHead(m.fc.in_features, num_classes, dropout), stages, arch, num_classes)
    return _finish(net, input_size=input_size, min_input_size=min_input_size, freeze=freeze,
                   weights_path=weights_path)


def vgg(arch: str, num_classes: int, input_size: int, pretrained: bool = False,
        weights_path: str | None = None, dropout: float = 0.3, freeze: int = 0,
        min_input_size: int = 32) -> Net:
    """torchvision VGG: one unit per conv(+BN)+ReLU and per max-pool; stages end at pools.

    The head keeps VGG's fully connected layers (most of its 143.7M parameters, as in the
    paper's count) and replaces the last one with dropout + a linear layer for the classes.
    """
    m = _torchvision(arch, pretrained, weights_path)
    units, stages, current, buf, conv_i, pool_i = [], [], [], [], 0, 0
    for layer in m.features:
        buf.append(layer)
        if isinstance(layer, nn.ReLU):
            conv_i += 1
            name = f"conv{conv_i}"
            units.append((name, seq(*buf)))
            current.append(name)
            buf = []
        elif isinstance(layer, nn.MaxPool2d):
            pool_i += 1
            name = f"pool{pool_i}"
            units.append((name, seq(*buf)))
            current.append(name)
            stages.append(current)
            current, buf = [], []
    classifier = list(m.classifier.children())[:-2]
    head = nn.Sequential(m.avgpool, nn.Flatten(), *classifier, nn.Dropout(dropout),
                         nn.Linear(m.classifier[-1].in_features, num_classes))
    net = Net(units, head, stages, arch, num_classes)
    return _finish(net, input_size=input_size, min_input_size=min_input_size, freeze=freeze,
                   weights_path=weights_path)


def efficientnet(arch: str, num_classes: int, input_size: int, pretrained: bool = False,
                 weights_path: str | None = None, dropout: float = 0.3, freeze: int = 0,
                 min_input_size: int = 32) -> Net:
    """torchvision EfficientNet: stem conv, one unit per MBConv block, the final 1x1 conv."""
    m = _torchvision(arch, pretrained, weights_path)
    feats = list(m.features.children())
    units, stages = [("stem", feats[0])], [["stem"]]
    for s, stage in enumerate(feats[1:-1], start=1):
        names = []
        for b, block in enumerate(stage):
            name = f"stage{s}_{b}"
            units.append((name, block))
            names.append(name)
        stages.append(names)
    units.append(("head_conv", feats[-1]))
    stages[-1].append("head_conv")
    in_features = m.classifier[-1].in_features
    net = Net(units, ClassifierHead(in_features, num_classes, dropout), stages, arch, num_classes)
    return _finish(net, input_size=input_size, min_input_size=min_input_size, freeze=freeze,
                   weights_path=weights_path)


def timm_xception(arch: str, num_classes: int, input_size: int, pretrained: bool = False,
                  weights_path: str | None = None, dropout: float = 0.3, freeze: int = 0,
                  min_input_size: int = 32) -> Net:
    """timm's (legacy) Xception, the Keras model of Jin & Song (Layer Importance Evaluation): entry stem, 12 blocks, exit convs."""
    import timm

    m = timm.create_model(arch, pretrained=False)

    def fetch() -> dict:
        return timm.create_model(arch, pretrained=True).state_dict()

    _load_state(m, arch, pretrained, weights_path, fetch)
    units = [("stem", seq(m.conv1, m.bn1, m.act1, m.conv2, m.bn2, m.act2))]
    blocks = [f"block{i}" for i in range(1, 13)]
    units += [(b, getattr(m, b)) for b in blocks]
    units += [("exit1", seq(m.conv3, m.bn3, m.act3)), ("exit2", seq(m.conv4, m.bn4, m.act4))]
    stages = [["stem"], blocks[:3], blocks[3:11], [blocks[11], "exit1", "exit2"]]
    net = Net(units, ClassifierHead(m.num_features, num_classes, dropout), stages, arch, num_classes)
    return _finish(net, input_size=input_size, min_input_size=min_input_size, freeze=freeze,
                   weights_path=weights_path)


def simple_cnn(num_classes: int, input_size: int, arch: str = "simple_cnn", pretrained: bool = False,
               weights_path: str | None = None, dropout: float = 0.3, freeze: int = 0,
               channels: tuple[int, int] = (32, 64), hidden: tuple[int, int] = (256, 128),
               min_input_size: int = 8) -> Net:
    """The small CNN of BaiNa & Joe (explainable channel attention): two conv layers, two poolings, three fully connected layers."""
    if pretrained or (weights_path and not _is_net_state(_read_state(weights_path))):
        raise ConfigError("simple_cnn has no ImageNet weights; set backbone.pretrained=false, and backbone.weights_path "
                          "to null or to a source task's weights saved by prunegrid (paths.weights_out)")
    c1, c2 = channels
    units = [
        ("conv1", seq(nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(inplace=True))),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", seq(nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(inplace=True))),
        ("pool2", nn.MaxPool2d(2)),
    ]
    h1, h2 = hidden
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c2 * 16, h1), nn.ReLU(inplace=True),
        nn.Linear(h1, h2), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(h2, num_classes),
    )
    net = Net(units, head, [["conv1", "pool1"], ["conv2", "pool2"]], arch, num_classes)
    return _finish(net, input_size=input_size, min_input_size=min_input_size, freeze=freeze,
                   weights_path=weights_path)


# -- any torchvision / timm CNN by name ---------------------------------------------------------

_HEAD_NAMES = {"avgpool", "global_pool", "fc", "classifier", "head", "heads", "dropout", "flatten", "pre_logits"}
_GROUP_ENDS = ("torch.nn.modules.activation", "torch.nn.modules.pooling")


def _flatten(named: Iterable[tuple[str, nn.Module]], prefix: str = "") -> list[tuple[str, nn.Module, str, int]]:
    """Modules in forward order, every module that runs as ``nn.Sequential`` opened into its children;
    each with its container's path and size (to name a unit made of a whole container after it)."""
    named = list(named)
    out = []
    for name, m in named:
        path = f"{prefix}{name}"
        if type(m).forward is nn.Sequential.forward and len(m._modules):
            out += _flatten(m.named_children(), path + ".")
        else:
            out.append((path, m, prefix.rstrip("."), len(named)))
    return out


def _is_layer(m: nn.Module) -> bool:
    """A single op (conv, norm, activation, pool), not a block: no Conv2d / Linear inside it."""
    return not any(isinstance(x, (nn.Conv2d, nn.Linear)) for x in m.modules() if x is not m)


def _label(run: list[tuple[str, nn.Module, str, int]], taken: set[str]) -> str:
    """A unit's name: its container's path when it is a whole container, else its first module's path."""
    parents = {parent for _, _, parent, _ in run}
    whole = len(parents) == 1 and run[0][2] and len(run) == run[0][3]
    name = re.sub(r"\W", "_", run[0][2] if whole else run[0][0])
    base, i = name, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def tree_units(named: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Units from a library's module tree, in forward order.

    Sequential containers are opened; every block (a module holding convolutions) is one unit;
    runs of single ops (conv, norm, activation, pool) are merged into one unit that ends at an
    activation or a pooling layer (conv+BN+ReLU, then the max-pool). Names are the module paths.
    """
    units, buf, taken = [], [], set()

    def flush():
        if buf:
            mods = [item[1] for item in buf]
            units.append((_label(buf, taken), mods[0] if len(mods) == 1 else seq(*mods)))
            buf.clear()

    for item in _flatten(named):
        m = item[1]
        if _is_layer(m):
            buf.append(item)
            if any(type(x).__module__ in _GROUP_ENDS for x in m.modules()):
                flush()
        else:
            flush()
            units.append((_label([item], taken), m))
    flush()
    return units


def _same_as_library(arch: str, trunk: nn.Module, library_features, input_size: int) -> int:
    """The chain of units must compute what the library's own feature extractor computes; returns
    the channels of its output (the head's input)."""
    x = torch.randn(2, 3, input_size, input_size)
    was = trunk.training
    trunk.eval()
    try:
        with torch.no_grad():
            try:
                theirs = library_features(x)
            except Exception as exc:
                raise ConfigError(f"dataset.input_size={input_size} is too small for backbone {arch}, or it is not "
                                  f"a CNN: {one_line(exc)[:160]}") from exc
            try:
                ours = trunk(x)
            except Exception:
                ours = None
    finally:
        trunk.train(was)
    if ours is None or ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4):
        raise ConfigError(f"backbone.arch={arch} does not run as a chain of its modules (its forward does more "
                          "than call them in order); it needs its own builder in prunegrid.models.backbones")
    return int(ours.shape[1])


def torchvision_cnn(arch: str, num_classes: int, input_size: int, pretrained: bool = False,
                    weights_path: str | None = None, dropout: float = 0.3, freeze: int = 0,
                    min_input_size: int = 32) -> Net:
    """Any torchvision classification CNN by name (``torchvision.models.list_models``).

    Units come from the model's module tree (:func:`tree_units`) up to its pooling / classifier
    (auxiliary heads left out); stages group units by output resolution; the head is a new
    :class:`ClassifierHead`. The chain is checked against torchvision's own feature extractor,
    so an architecture whose forward is not a chain of its modules is refused in one line.
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ConfigError(f"backbone.arch={arch} is not a torchvision classification model; "
                          f"see torchvision.models.list_models() (e.g. {', '.join(names[:4])}, ...)")
    if input_size < min_input_size:
        raise ConfigError(f"dataset.input_size={input_size} is too small for backbone {arch} "
                          f"(minimum {min_input_size}); set dataset.input_size={min_input_size} or more")
    m = _torchvision(arch, pretrained, weights_path)
    trunk = []
    for name, child in m.named_children():
        if name in _HEAD_NAMES:
            break
        if not name.lower().startswith("aux"):
            trunk.append((name, child))
    if not trunk:
        raise ConfigError(f"backbone.arch={arch}: no feature modules before its classifier")
    units = tree_units(trunk)
    try:
        library = create_feature_extractor(m.eval(), return_nodes={trunk[-1][0]: "out"})
    except Exception as exc:
        raise ConfigError(f"backbone.arch={arch}: torchvision cannot extract its features ({one_line(exc)})") from exc
    channels = _same_as_library(arch, seq(*[u for _, u in units]), lambda x: library(x)["out"], input_size)
    return _generic_net(arch, units, channels, num_classes, input_size, dropout, freeze, min_input_size, weights_path)


def timm_cnn(arch: str, num_classes: int, input_size: int, pretrained: bool = False,
             weights_path: str | None = None, dropout: float = 0.3, freeze: int = 0,
             min_input_size: int = 32) -> Net:
    """Any timm CNN by name (``timm.list_models``), through timm's own feature stages.

    timm builds the model with ``features_only`` (its ``feature_info`` stages, the classifier and
    global pooling left out); the units are that feature model's modules in order
    (:func:`tree_units`), checked against the feature model's own output; stages group units by
    output resolution. ImageNet weights come through timm (``pretrained``), or from a local file
    through timm's ``pretrained_cfg_overlay`` (``weights_path``).
    """
    import timm

    if arch not in timm.list_models():
        raise ConfigError(f"backbone.arch={arch} is not a timm model; see timm.list_models()")
    if input_size < min_input_size:
        raise ConfigError(f"dataset.input_size={input_size} is too small for backbone {arch} "
                          f"(minimum {min_input_size}); set dataset.input_size={min_input_size} or more")
    kw: dict = {}
    if weights_path and not _is_net_state(_read_state(weights_path)):
        kw = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(Path(weights_path).expanduser())}}
    elif pretrained:
        kw = {"pretrained": True}
    try:
        feats = timm.create_model(arch, features_only=True, out_indices=(-1,), **kw)
    except Exception as exc:
        if kw:
            raise ConfigError(f"cannot load weights for {arch} ({one_line(exc)}); run with backbone.pretrained=false, "
                              "or set backbone.weights_path=FILE to its state dict") from exc
        raise ConfigError(f"backbone.arch={arch}: timm cannot build its feature stages ({one_line(exc)}); "
                          "use a CNN") from exc
    units = tree_units(feats.named_children())
    channels = _same_as_library(arch, seq(*[u for _, u in units]), lambda x: feats(x)[-1], input_size)
    return _generic_net(arch, units, channels, num_classes, input_size, dropout, freeze, min_input_size, weights_path)


def _generic_net(arch: str, units: list[tuple[str, nn.Module]], channels: int, num_classes: int, input_size: int,
                 dropout: float, freeze: int, min_input_size: int, weights_path: str | None) -> Net:
    net = Net(units, ClassifierHead(channels, num_classes, dropout), None, arch, num_classes)
    return _finish(net, input_size=input_size, min_input_size=min_input_size, freeze=freeze,
                   weights_path=weights_path)
