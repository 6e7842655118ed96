"""``prune=slimming``: network slimming (Liu et al., ICCV 2017, "Learning Efficient Convolutional
Networks through Network Slimming"), named as future work in Ju & Kang (on-device lightweight methods).

Training adds an L1 penalty on every BatchNorm scale gamma: after each backward pass
torch-pruning's ``BNScalePruner.regularize`` adds its subgradient ``lambda * sign(gamma)`` to the
gammas' gradients (the classifier excluded), which drives the scales of unneeded channels towards
zero. The paper trains with SGD; with Adam / AdamW (this project's default optimizer) the added
term is divided by the running second moment of each gamma's gradient like the rest of it, so a
given ``lambda`` is not the paper's penalty and values compare only within one optimizer. After training, channels are ranked by
|gamma| across the whole network (one global threshold, as in the paper) and removed with the
same torch-pruning code as :mod:`prunegrid.pruning.channel`; then the slim model is fine-tuned.
"""

from __future__ import annotations

import warnings

import torch
import torch_pruning as tp
from lightning.pytorch.callbacks import Callback
from torch import nn

from prunegrid import measure
from prunegrid.errors import ConfigError
from prunegrid.models.net import BATCHNORM, CONV, LOGITS, Net
from prunegrid.pruning.base import Context
from prunegrid.pruning.channel import ChannelPruning, all_trainable, protected_layers


def bn_scales(net: nn.Module) -> torch.Tensor:
    """All BatchNorm scales (gamma) of ``net``, concatenated."""
    gammas = [m.weight.detach().flatten() for m in net.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    return torch.cat(gammas) if gammas else torch.zeros(0)


class BNSparsity(Callback):
    """Sparsity training: torch-pruning's ``BNScalePruner.regularize`` after every backward pass.

    The pruner is built on the net when the fit starts (at ``input_size``), with the contract's
    protected layers ignored.
    """

    def __init__(self, sparsity_lambda: float, input_size: int):
        self.sparsity_lambda, self.input_size = float(sparsity_lambda), int(input_size)
        self.pruner: tp.pruner.BNScalePruner | None = None

    def attach(self, net: Net) -> None:
        with warnings.catch_warnings(), all_trainable(net):
            warnings.simplefilter("ignore")
            self.pruner = tp.pruner.BNScalePruner(
                net, torch.zeros(1, 3, self.input_size, self.input_size, device=measure._device(net)),
                importance=tp.importance.BNScaleImportance(), reg=self.sparsity_lambda,
                ignored_layers=protected_layers(net))

    def on_fit_start(self, trainer, pl_module) -> None:
        self.attach(pl_module.net)

    def on_after_backward(self, trainer, pl_module) -> None:
        self.pruner.regularize(pl_module.net)


class NetworkSlimming(ChannelPruning):
    """Sparsity training on BN scales, global pruning by |gamma|, fine-tuning.

    Args:
        sparsity_lambda: weight of the L1 penalty on BN scales (the paper's lambda, 1e-4 / 1e-5 for
            160 epochs of SGD; larger for the short CPU runs here).
        ratio: share of all BN-followed channels removed (global threshold), in (0, 1).
        max_layer_ratio: most any one layer may lose, in (0, 1).
        importance: ``bn_scale`` (the paper: smallest |gamma| first) or ``random`` (the random control:
            the same sparsity training and share removed, channels chosen at random).
        reinit: Scratch-E (see :class:`~prunegrid.pruning.base.PruningMethod`).
    """

    name = "slimming"
    from_baseline = False
    requires = (CONV, BATCHNORM, LOGITS)

    def __init__(self, sparsity_lambda: float = 1e-3, ratio: float = 0.5, max_layer_ratio: float = 0.9,
                 finetune_epochs: int = 1, baseline_ckpt: str | None = None, importance: str = "bn_scale",
                 reinit: bool = False):
        if sparsity_lambda is None or sparsity_lambda < 0:
            raise ConfigError(f"prune.sparsity_lambda={sparsity_lambda} must be 0 or more")
        if baseline_ckpt:
            raise ConfigError("prune=slimming trains with its own BN penalty from scratch; set prune.baseline_ckpt=null")
        if importance not in ("bn_scale", "random"):
            raise ConfigError(f"prune.importance={importance} must be bn_scale (network slimming) or random (its control)")
        super().__init__(importance=importance, ratio=ratio, global_pruning=True, max_layer_ratio=max_layer_ratio,
                         finetune_epochs=finetune_epochs, baseline_ckpt=None, reinit=reinit)
        self.sparsity_lambda = float(sparsity_lambda)
        self.gamma_before: torch.Tensor | None = None

    def before_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        self.gamma_before = bn_scales(net).abs().clone()
        return net

    def callbacks(self, ctx: Context) -> list:
        return [BNSparsity(self.sparsity_lambda, ctx.input_size)]

    def after_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        gamma = bn_scales(net).abs()
        ctx.log_metrics({
            self.key("bn_l1_before"): float(self.gamma_before.mean()) if self.gamma_before is not None else float("nan"),
            self.key("bn_l1_after_train"): float(gamma.mean()),
            self.key("bn_small_share"): float((gamma < 0.01 * gamma.max()).float().mean()),
        })
        return super().after_fit(net, ctx)

    def report(self, net: nn.Module, ctx: Context) -> dict[str, float]:
        return {**super().report(net, ctx), self.key("sparsity_lambda"): self.sparsity_lambda}
