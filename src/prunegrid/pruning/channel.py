"""``prune=channel``: structured channel pruning that leaves a physically smaller, dense model.

Unstructured sparsity (Ju & Kang (on-device lightweight methods), static/dynamic L1) keeps every tensor at full size, so a
dense runtime is neither faster nor smaller. Removing whole output channels (filters) together
with every input channel, BatchNorm entry and residual partner that depends on them gives a
thinner network of ordinary dense layers. The dependency bookkeeping is torch-pruning's
DepGraph (Fang et al., CVPR 2023, "DepGraph: Towards Any Structural Pruning"); this module
only chooses the importance criterion, the ratio and the protected classifier, and checks the
result. Channels are ranked by the L1 / L2 norm of their weights (Li et al., ICLR 2017,
"Pruning Filters for Efficient ConvNets"), their BatchNorm scale (Liu et al., ICCV 2017, the
criterion of :mod:`prunegrid.pruning.slimming`) or a first-order Taylor estimate of the loss
change (Molchanov et al., CVPR 2019), the last from gradients of a few training batches.
``global_pruning=false`` removes the same share of every layer; ``true`` ranks all channels of
the network together, each layer capped at ``max_layer_ratio`` so that none is emptied.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from prunegrid import measure
from prunegrid.errors import ConfigError, one_line
from prunegrid.models.net import CONV, LOGITS, Net
from prunegrid.pruning.base import Context, PruningMethod, check_fraction

IMPORTANCES = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(normalizer=None),  # raw |gamma|: one global threshold
    "taylor": tp.importance.TaylorImportance,
    "random": tp.importance.RandomImportance,  # the random control: the same structural change, ranked at random
}


def protected_layers(net: Net) -> list[nn.Module]:
    """The layers the net's contract says must never be pruned (the classifier's last Linear)."""
    return [net.get_submodule(name) for name in net.contract.protected]


def prunable_layers(net: nn.Module) -> dict[str, nn.Module]:
    """Conv / Linear layers whose output channels may be removed (the classifier excluded)."""
    keep = {id(m) for m in protected_layers(net)}
    return {n: m for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in keep}


def _width(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def check_ratios(ratio: float, max_layer_ratio: float, key: str = "ratio") -> None:
    """Raise if ``ratio`` / ``max_layer_ratio`` are out of range or ``ratio`` is above the cap.

    No layer can be emptied whatever the ratio: a group that would take every channel of a layer
    is cut to keep ``max(1, ceil(width * (1 - max_layer_ratio)))`` of them (:func:`_capped`).
    """
    check_fraction(key, ratio, low_open=True)
    check_fraction("max_layer_ratio", max_layer_ratio, low_open=True)
    if ratio > max_layer_ratio:
        raise ConfigError(f"prune.{key}={ratio} is above prune.max_layer_ratio={max_layer_ratio}; "
                          f"lower the ratio or raise max_layer_ratio (< 1)")


@contextlib.contextmanager
def all_trainable(net: nn.Module):
    """Every parameter requires grad inside the block (torch-pruning traces through autograd: a frozen
    stem would drop out of its residual group); each parameter's flag comes back by name afterwards,
    also for the new, thinner parameters pruning puts in their place. Each module's train/eval mode
    comes back too: torch-pruning traces in eval mode, and a net left there would train with frozen
    BatchNorm statistics."""
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    modes = {n: m.training for n, m in net.named_modules()}
    for p in net.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for n, p in net.named_parameters():
            p.requires_grad_(flags.get(n, True))
        for n, m in net.named_modules():
            m.training = modes.get(n, m.training)


def check_traceable(net: Net, method: str, input_size: int) -> None:
    """Build torch-pruning's dependency graph now, so a backbone it cannot trace is refused before training."""
    try:
        with warnings.catch_warnings(), all_trainable(net):
            warnings.simplefilter("ignore")
            tp.DependencyGraph().build_dependency(
                net, torch.zeros(1, 3, input_size, input_size, device=measure._device(net)),
                ignored_layers=protected_layers(net))
    except Exception as exc:
        raise ConfigError(f"prune={method} cannot serve backbone {net.arch}: torch-pruning cannot trace its channel "
                          f"dependencies ({one_line(exc)[:160]}); use another prune method") from exc


def _accumulate_gradients(net: nn.Module, batches, loss: Callable) -> None:
    """Gradients of the cell's own loss over a few training batches (for Taylor importance), all
    parameters included."""
    was = net.training
    net.eval()
    net.zero_grad(set_to_none=True)
    with torch.enable_grad(), all_trainable(net):
        for x, y in batches:
            loss(net(x), y).backward()
    net.train(was)


def prune_channels(net: Net, *, importance: str, ratio: float, global_pruning: bool, max_layer_ratio: float,
                   input_size: int, batches=(), loss: Callable | None = None) -> nn.Module:
    """Remove ``ratio`` of the channels of ``net`` in place (torch-pruning), re-declare its contract
    (thinner units) and return it.

    ``batches`` (``(x, y)`` pairs) and ``loss`` (the cell's configured loss) give the gradients for
    ``importance="taylor"``. Per-layer ``requires_grad`` (frozen stages) is kept; in global mode no layer loses more than
    ``max_layer_ratio`` of its channels.
    """
    if importance not in IMPORTANCES:
        raise ConfigError(f"prune.importance={importance} is unknown; use one of {', '.join(IMPORTANCES)}")
    device = measure._device(net)
    if importance == "taylor":
        if loss is None:
            raise ValueError("importance='taylor' needs the loss its gradients come from")
        _accumulate_gradients(net, [(x.to(device), y.to(device)) for x, y in batches], loss)
    example = torch.zeros(1, 3, input_size, input_size, device=device)
    imp = IMPORTANCES[importance]()
    with warnings.catch_warnings(), all_trainable(net):
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(net, example, importance=imp, pruning_ratio=ratio,
                                      global_pruning=global_pruning, max_pruning_ratio=max_layer_ratio,
                                      ignored_layers=protected_layers(net))
        check = pruner.DG.check_pruning_group
        pruner.DG.check_pruning_group = lambda group: True  # over-full groups are capped below, not skipped whole
        for group in pruner.step(interactive=True):
            group = _capped(pruner, group, imp, max_layer_ratio)
            if group is not None and check(group):
                group.prune()
    net.zero_grad(set_to_none=True)
    net.declare(input_size)
    return net


def _capped(pruner, group, imp, max_layer_ratio: float):
    """The group, with its least important channels only, if it would leave a layer too thin.

    torch-pruning's global ranking may select every channel of a layer whose scores are all low
    (e.g. BatchNorm scales driven to zero by slimming) and then skips that layer altogether; this
    prunes it down to ``1 - max_layer_ratio`` of its channels instead.
    """
    dep, idxs = group[0].dep, [int(i) for i in group[0].idxs]
    layer, fn = dep.target.module, dep.handler
    out = pruner.DG.is_out_channel_pruning_fn(fn)
    width = pruner.DG.get_out_channels(layer) if out else pruner.DG.get_in_channels(layer)
    if width is None:
        return group
    allowed = width - max(1, math.ceil(width * (1 - max_layer_ratio)))
    if len(idxs) <= allowed:
        return group
    if allowed <= 0:
        return None
    scores = imp(pruner.DG.get_pruning_group(layer, fn, list(range(width))))
    ranked = sorted(idxs, key=lambda i: float(scores[i])) if scores is not None else idxs
    return pruner.DG.get_pruning_group(layer, fn, ranked[:allowed])


class ChannelPruning(PruningMethod):
    """Prune channels of the trained model (after_fit), then fine-tune.

    Args:
        importance: ``l1``, ``l2``, ``bn_scale``, ``taylor`` (gradients of ``calibration_batches``
            training batches) or ``random`` (the random control).
        ratio: share of channels removed, in (0, 1); 0.5 keeps half the channels of every layer.
        global_pruning: rank channels across the whole network (false: the same share per layer).
        max_layer_ratio: most any one layer may lose, in (0, 1) and at least ``ratio``.
        calibration_batches: training batches for Taylor importance.
        reinit: Scratch-E (see :class:`~prunegrid.pruning.base.PruningMethod`).
    """

    name = "channel"
    from_baseline = True
    structural = True
    controls = ("random", "scratch")
    requires = (CONV, LOGITS)  # importance and the Taylor loss read class logits

    def __init__(self, importance: str = "l1", ratio: float = 0.5, global_pruning: bool = False,
                 max_layer_ratio: float = 0.9, calibration_batches: int = 4, finetune_epochs: int = 1,
                 baseline_ckpt: str | None = None, reinit: bool = False):
        super().__init__(baseline_ckpt=baseline_ckpt, finetune_epochs=finetune_epochs, reinit=reinit)
        if importance not in IMPORTANCES:
            raise ConfigError(f"prune.importance={importance} is unknown; use one of {', '.join(IMPORTANCES)}")
        check_fraction("ratio", ratio, low_open=True)
        check_fraction("max_layer_ratio", max_layer_ratio, low_open=True)
        if calibration_batches is None or calibration_batches < 1:
            raise ConfigError(f"prune.calibration_batches={calibration_batches} must be 1 or more")
        self.importance = importance
        self.ratio = float(ratio)
        self.global_pruning = bool(global_pruning)
        self.max_layer_ratio = float(max_layer_ratio)
        self.calibration_batches = int(calibration_batches)
        self.before: dict[str, float] = {}
        self.channels_before = 0

    def check(self, net: Net, ctx: Context) -> None:
        check_ratios(self.ratio, self.max_layer_ratio)
        check_traceable(net, self.name, ctx.input_size)

    def _batches(self, ctx: Context):
        if self.importance != "taylor":
            return []
        out = []
        for i, batch in enumerate(ctx.loader("train", shuffle=True)):
            if i >= self.calibration_batches:
                break
            out.append(batch)
        return out

    def after_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        self.before = measure.static_metrics(net, ctx.input_size)
        self.channels_before = sum(_width(m) for m in prunable_layers(net).values())
        prune_channels(net, importance=self.importance, ratio=self.ratio, global_pruning=self.global_pruning,
                       max_layer_ratio=self.max_layer_ratio, input_size=ctx.input_size, batches=self._batches(ctx),
                       loss=ctx.loss)
        after = measure.static_metrics(net, ctx.input_size)
        if after["model/params"] >= self.before["model/params"]:
            raise ConfigError(f"prune={self.name} removed no channel of {net.arch}; "
                              "raise prune.ratio or check that the backbone has prunable layers")
        return net

    def report(self, net: nn.Module, ctx: Context) -> dict[str, float]:
        after = measure.static_metrics(net, ctx.input_size)
        widths = [_width(m) for m in prunable_layers(net).values()]
        return {self.key(k): v for k, v in {
            "ratio": self.ratio,
            "global": float(self.global_pruning),
            "params_before": self.before.get("model/params", float("nan")),
            "params_after": after["model/params"],
            "flops_before": self.before.get("model/flops", float("nan")),
            "flops_after": after["model/flops"],
            "channels_removed_share": 1 - sum(widths) / self.channels_before if self.channels_before else 0.0,
            "min_layer_width": float(min(widths)) if widths else 0.0,
        }.items()}
