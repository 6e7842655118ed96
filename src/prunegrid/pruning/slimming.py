"""``prune=slimming``: network slimming (Liu et al., ICCV 2017, "Learning Efficient Convolutional
Networks through Network Slimming"), named as future work in Ju & Kang (on-device lightweight methods).

Training adds an L1 penalty on every BatchNorm scale gamma (its subgradient
``lambda * sign(gamma)`` is added to the gammas' gradients after each backward pass), which
drives the scales of unneeded channels towards zero. After training, channels are ranked by
|gamma| across the whole network (one global threshold, as in the paper) and removed with the
same torch-pruning code as :mod:`prunegrid.pruning.channel`; then the slim model is fine-tuned.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from prunegrid.errors import ConfigError
from prunegrid.pruning.base import Context
from prunegrid.pruning.channel import ChannelPruning


def bn_scales(net: nn.Module) -> torch.Tensor:
    """All BatchNorm scales (gamma) of ``net``, concatenated."""
    gammas = [m.weight.detach().flatten() for m in net.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    return torch.cat(gammas) if gammas else torch.zeros(0)


class BNSparsity(Callback):
    """Adds the subgradient of ``lambda * sum |gamma|`` to the BatchNorm scales' gradients."""

    def __init__(self, sparsity_lambda: float):
        self.sparsity_lambda = float(sparsity_lambda)

    def on_after_backward(self, trainer, pl_module) -> None:
        for m in pl_module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.weight.grad is not None:
                m.weight.grad.add_(self.sparsity_lambda * torch.sign(m.weight.detach()))


class NetworkSlimming(ChannelPruning):
    """Sparsity training on BN scales, global pruning by |gamma|, fine-tuning.

    Args:
        sparsity_lambda: weight of the L1 penalty on BN scales (the paper's lambda, 1e-4 / 1e-5 for
            160 epochs of SGD; larger for the short CPU runs here).
        ratio: share of all BN-followed channels removed (global threshold), in (0, 1).
        max_layer_ratio: most any one layer may lose, in (0, 1).
    """

    name = "slimming"
    from_baseline = False

    def __init__(self, sparsity_lambda: float = 1e-3, ratio: float = 0.5, max_layer_ratio: float = 0.9,
                 finetune_epochs: int = 1, baseline_ckpt: str | None = None):
        if sparsity_lambda is None or sparsity_lambda < 0:
            raise ConfigError(f"prune.sparsity_lambda={sparsity_lambda} must be 0 or more")
        if baseline_ckpt:
            raise ConfigError("prune=slimming trains with its own BN penalty from scratch; set prune.baseline_ckpt=null")
        super().__init__(importance="bn_scale", ratio=ratio, global_pruning=True, max_layer_ratio=max_layer_ratio,
                         finetune_epochs=finetune_epochs, baseline_ckpt=None)
        self.sparsity_lambda = float(sparsity_lambda)
        self.gamma_before: torch.Tensor | None = None

    def check(self, net: nn.Module, ctx: Context) -> None:
        super().check(net, ctx)
        if bn_scales(net).numel() == 0:
            raise ConfigError(f"prune=slimming needs BatchNorm layers; {getattr(net, 'arch', 'this backbone')} has "
                              "none, use prune=channel")

    def before_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        self.gamma_before = bn_scales(net).abs().clone()
        return net

    def callbacks(self, ctx: Context) -> list:
        return [BNSparsity(self.sparsity_lambda)]

    def after_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        gamma = bn_scales(net).abs()
        ctx.log_metrics({
            f"{self.name}/bn_l1_before": float(self.gamma_before.mean()) if self.gamma_before is not None else float("nan"),
            f"{self.name}/bn_l1_after_train": float(gamma.mean()),
            f"{self.name}/bn_small_share": float((gamma < 0.01 * gamma.max()).float().mean()),
        })
        return super().after_fit(net, ctx)

    def report(self, net: nn.Module, ctx: Context) -> dict[str, float]:
        return {**super().report(net, ctx), f"{self.name}/sparsity_lambda": self.sparsity_lambda}
