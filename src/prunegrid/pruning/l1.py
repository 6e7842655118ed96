"""Static and dynamic L1-unstructured pruning of Conv2d and BatchNorm2d weights (Ju & Kang (on-device lightweight methods)).

Ju & Kang (on-device lightweight methods) ("Analysis on Lightweight Methods of On-Device AI Vision Model for Intelligent
Edge Computing Devices", Ju & Kang 2024) prunes the weights of every Conv2d and BatchNorm2d
layer by L1 magnitude with ``torch.nn.utils.prune`` and compares two timings:

* ``l1_static`` prunes once, before training, and makes the pruning permanent;
* ``l1_dynamic`` prunes again at every epoch during training (Algorithm 1: at the start of each
  epoch prune ``amount`` of the weights and make it permanent; weights may regrow in between).

Sparsity is measured per layer type as in the paper's Algorithm 1 (zero weights over all
weights of that type) by :func:`prunegrid.measure.layer_sparsity`.

Unstructured zeros keep every tensor dense: the model is neither smaller on disk (unless
stored compressed, ``model/size_mb_compressed``) nor faster in eager PyTorch or ONNX Runtime;
the grid reports that as measured.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.utils.prune as prune
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn

from prunegrid import measure
from prunegrid.errors import ConfigError
from prunegrid.models.net import BATCHNORM, CONV, Net
from prunegrid.pruning.base import RANDOM, Context, PruningMethod, check_fraction

log = logging.getLogger("prunegrid")

NAMESPACE = "l1"
L1_CONV_SPARSITY = "l1/conv_sparsity"    # Algorithm 1 of Ju & Kang (on-device lightweight methods), final model
L1_BN_SPARSITY = "l1/bn_sparsity"
L1_EPOCH_CONV_SPARSITY = "l1/epoch_conv_sparsity"  # per epoch during l1_dynamic training (step = epoch)
L1_EPOCH_BN_SPARSITY = "l1/epoch_bn_sparsity"
L1_PRUNE_CONV_SPARSITY = "l1/prune_conv_sparsity"  # right after each epoch's pruning (schedule=paper)
L1_PRUNE_BN_SPARSITY = "l1/prune_bn_sparsity"
KINDS: dict[str, type[nn.Module]] = {"conv": nn.Conv2d, "bn": nn.BatchNorm2d}
SCOPES = ("layerwise", "global")
SCHEDULES = ("paper", "gradual", "constant")
RAMPS = ("linear", "cubic")
IMPORTANCES = ("l1", RANDOM)


def weights(net: nn.Module, kind: type[nn.Module]) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` of every ``kind`` layer that has a weight (affine BN only)."""
    return [(m, "weight") for m in net.modules() if isinstance(m, kind) and getattr(m, "weight", None) is not None]


def l1_prune(net: nn.Module, kind: type[nn.Module], amount: float, scope: str, importance: str = "l1") -> None:
    """Mask the ``amount`` smallest-|w| weights of all ``kind`` layers: per layer, or ranked globally.

    ``importance="random"`` is the random control: the same share, ranked at random among the
    non-zero weights (zeros rank lowest, as under L1, so pruning an already sparse layer adds to it).
    Repeated calls stack (torch's ``PruningContainer``): ``amount`` is then a share of the
    weights still unpruned.
    """
    params = weights(net, kind)
    if not params or amount <= 0:
        return
    if importance not in IMPORTANCES:
        raise ConfigError(f"prune.importance={importance} must be one of {', '.join(IMPORTANCES)}")
    scores = {p: _random_scores(getattr(*p)) for p in params} if importance == RANDOM else None
    if scope == "global":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount,
                                  importance_scores=scores)
    else:
        for module, name in params:
            prune.l1_unstructured(module, name, amount=amount,
                                  importance_scores=None if scores is None else scores[(module, name)])


def _random_scores(weight: torch.Tensor) -> torch.Tensor:
    nonzero = (weight.detach() != 0).to(weight.dtype)
    return nonzero * (1 + torch.rand_like(weight.detach()))


def make_permanent(net: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight and drop the re-parametrisation (``prune.remove``)."""
    for module in net.modules():
        for hook in [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]:
            prune.remove(module, hook._tensor_name)
    return net


def sparsity_metrics(net: nn.Module) -> dict[str, float]:
    """Algorithm 1 of Ju & Kang (on-device lightweight methods) for Conv2d and BatchNorm2d weights."""
    return {L1_CONV_SPARSITY: measure.layer_sparsity(net, nn.Conv2d),
            L1_BN_SPARSITY: measure.layer_sparsity(net, nn.BatchNorm2d)}


class _L1Pruning(PruningMethod):
    """Options shared by both timings.

    Args:
        amount: share of Conv2d weights pruned (paper, YOLOv5m: 0.4).
        bn_amount: share of BatchNorm2d weights (scales) pruned (paper: 0.3).
        scope: ``layerwise`` (each layer loses ``amount`` of its weights, as the paper's loop over
            modules) or ``global`` (one L1 ranking over all layers of a type,
            ``prune.global_unstructured``).
        importance: ``l1`` (magnitude) or ``random`` (the random control: the same shares, at random).
    """

    requires = (CONV,)
    namespace = NAMESPACE
    controls = (RANDOM,)

    def __init__(self, amount: float = 0.4, bn_amount: float = 0.3, scope: str = "layerwise",
                 importance: str = "l1", **kw):
        super().__init__(**kw)
        if importance not in IMPORTANCES:
            raise ConfigError(f"prune.importance={importance} must be one of {', '.join(IMPORTANCES)}")
        self.importance = importance
        check_fraction("amount", amount)
        check_fraction("bn_amount", bn_amount)
        if scope not in SCOPES:
            raise ConfigError(f"prune.scope={scope} must be one of {', '.join(SCOPES)}")
        self.amounts = {"conv": float(amount), "bn": float(bn_amount)}
        self.scope = scope

    def check(self, net: Net, ctx: Context) -> None:
        if self.amounts["bn"] > 0 and BATCHNORM not in net.contract.capabilities:
            log.warning("prune.bn_amount=%s: %s has no BatchNorm2d weights; only Conv2d is pruned "
                        "(l1/bn_layers=0 records it)", self.amounts["bn"], net.arch)

    def prune_all(self, net: nn.Module, amounts: dict[str, float]) -> None:
        for kind, amount in amounts.items():
            l1_prune(net, KINDS[kind], amount, self.scope, self.importance)

    def report(self, net: nn.Module, ctx: Context) -> dict[str, float]:
        return {**sparsity_metrics(net), self.key("conv_layers"): len(weights(net, nn.Conv2d)),
                self.key("bn_layers"): len(weights(net, nn.BatchNorm2d))}


class L1Static(_L1Pruning):
    """``l1_static``: prune once before training (Ju & Kang (on-device lightweight methods), Fig. 3-4), permanent at the end.

    The paper applies ``prune.remove`` right after pruning, before training. Training then
    updates the zeroed weights like any other (their gradient is not zero), so the model regrows
    and the sparsity reported for the paper's setting would not be the trained model's: measured on
    Fashion-MNIST after only 4 AdamW steps, Conv2d sparsity 0.40 -> 0.21 (simple_cnn) and
    0.40 -> 0.36 (resnet18, 16 px), falling further with more steps; the zeroed BatchNorm scales
    stayed at 0.30 in those runs. So by default (``hold_mask: true``) the masks stay
    as ``torch.nn.utils.prune`` forward pre-hooks during training (pruned weights get zero
    gradient and stay zero) and are made permanent in ``after_fit``; ``hold_mask: false``
    reproduces the paper's order literally and reports the sparsity that is left.

    When the method starts from a trained baseline (``baseline_ckpt``), there is no training to
    prune before, so the trained weights are pruned in ``after_fit`` (the paper's other static
    variant, "after training ends").
    """

    name = "l1_static"

    def __init__(self, amount: float = 0.4, bn_amount: float = 0.3, scope: str = "layerwise",
                 hold_mask: bool = True, **kw):
        super().__init__(amount, bn_amount, scope, **kw)
        self.hold_mask = bool(hold_mask)
        self._pruned = False

    def before_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        self.prune_all(net, self.amounts)
        self._pruned = True
        ctx.log_metrics({f"{k}_before_fit": v for k, v in sparsity_metrics(net).items()})
        return net if self.hold_mask else make_permanent(net)

    def after_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        if not self._pruned:
            self.prune_all(net, self.amounts)
            self._pruned = True
        return make_permanent(net)


def cumulative_sparsity(amount: float, epoch: int, epochs: int, schedule: str, ramp: str) -> float:
    """Target sparsity after the pruning at the start of ``epoch`` (0-based) of ``epochs``.

    ``paper``: ``amount`` at every pruning (the weights regrow in between, and each pruning
    brings the layer back to ``amount``).
    ``constant``: ``amount`` of the *remaining* weights each epoch with masks held, so it
    compounds: ``1 - (1 - amount)^(epoch+1)``.
    ``gradual``: towards the final ``amount`` at the last epoch, ``linear`` or ``cubic``
    (Zhu & Gupta 2017: fast early, slow late).
    """
    if schedule == "paper":
        return amount
    if schedule == "constant":
        return 1.0 - (1.0 - amount) ** (epoch + 1)
    f = min(1.0, (epoch + 1) / max(1, epochs))
    return amount * (f if ramp == "linear" else 1.0 - (1.0 - f) ** 3)


def step_amount(amount: float, epoch: int, epochs: int, schedule: str, ramp: str) -> float:
    """Share of the *still unpruned* weights to prune at ``epoch`` to reach the cumulative target."""
    now = cumulative_sparsity(amount, epoch, epochs, schedule, ramp)
    before = cumulative_sparsity(amount, epoch - 1, epochs, schedule, ramp) if epoch > 0 else 0.0
    return max(0.0, 1.0 - (1.0 - now) / (1.0 - before))


class EpochStartPruning(ModelPruning):
    """Lightning's ``ModelPruning`` restricted to one layer type and run at each epoch's *start*.

    ``ModelPruning`` prunes at the end of the train (or validation) epoch, after validation and
    checkpointing; pruning at the start instead means every epoch trains, validates and is
    checkpointed with its new mask (the last pruning is not left untrained). Masks are torch
    pruning hooks, so pruned weights get zero gradient and stay zero through optimizer steps;
    ``make_pruning_permanent`` folds them in at the end of training and in every checkpoint.
    The lottery-ticket rewind of ``ModelPruning`` is off (the paper keeps training).
    """

    def __init__(self, kind: type[nn.Module], amount: float, schedule: str, ramp: str, scope: str,
                 importance: str = "l1"):
        self.kind, self.target, self.schedule, self.ramp = kind, amount, schedule, ramp
        self.epochs = 1
        super().__init__(f"{importance}_unstructured", parameter_names=["weight"], use_global_unstructured=scope == "global",
                         amount=self._amount, make_pruning_permanent=True, use_lottery_ticket_hypothesis=False,
                         prune_on_train_epoch_end=False)

    def _amount(self, epoch: int) -> float:
        return step_amount(self.target, epoch, self.epochs, self.schedule, self.ramp)

    def filter_parameters_to_prune(self, parameters_to_prune=()):
        return [(m, n) for m, n in parameters_to_prune if isinstance(m, self.kind)]

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.epochs = int(trainer.max_epochs or 1)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._parameters_to_prune:
            self._run_pruning(pl_module.current_epoch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pass


class PaperDynamicPruning(Callback):
    """Algorithm 1 of Ju & Kang (on-device lightweight methods) (dynamic): at the start of every epoch, prune ``amounts`` of
    each layer type's weights by L1 magnitude and make the pruning permanent (``prune.remove``).

    Training then updates the zeroed weights like any other, so they may regrow during the
    epoch; the next pruning brings every layer back to ``amount``. ``history`` holds the
    Conv2d/BatchNorm2d sparsity right after each pruning (logged as ``l1/prune_conv_sparsity``).
    """

    def __init__(self, amounts: dict[str, float], scope: str, importance: str = "l1"):
        self.amounts, self.scope, self.importance = amounts, scope, importance
        self.history: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        for kind, amount in self.amounts.items():
            l1_prune(pl_module, KINDS[kind], amount, self.scope, self.importance)
        make_permanent(pl_module)
        self.history.append(sparsity_metrics(pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.history:
            pl_module.log(L1_PRUNE_CONV_SPARSITY, self.history[-1][L1_CONV_SPARSITY], on_epoch=True)
            pl_module.log(L1_PRUNE_BN_SPARSITY, self.history[-1][L1_BN_SPARSITY], on_epoch=True)


class SparsityLogger(Callback):
    """Logs Algorithm 1's Conv2d/BatchNorm2d sparsity each epoch through the run's logger (step = epoch)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        m = sparsity_metrics(pl_module)
        pl_module.log(L1_EPOCH_CONV_SPARSITY, m[L1_CONV_SPARSITY], on_epoch=True)
        pl_module.log(L1_EPOCH_BN_SPARSITY, m[L1_BN_SPARSITY], on_epoch=True)


class L1Dynamic(_L1Pruning):
    """``l1_dynamic``: L1 pruning at every epoch during training (Ju & Kang (on-device lightweight methods), dynamic pruning).

    Args:
        schedule: ``paper`` (default, Algorithm 1): at the start of every epoch prune ``amount``
            (and ``bn_amount``) of all weights and make it permanent, so pruned weights may regrow
            until the next pruning (:class:`PaperDynamicPruning`). ``gradual`` holds the masks and
            ramps the sparsity to ``amount`` at the last epoch (``ramp``: ``linear`` or ``cubic``).
            ``constant`` holds the masks and prunes ``amount`` of the *remaining* weights every
            epoch, so it compounds to ``1 - (1 - amount)^epochs``.

    The pipeline keeps the best checkpoint by validation loss; ``after_fit`` prunes that model
    once more to the schedule's final sparsity and makes it permanent, so the reported model has
    it; ``l1/fit_conv_sparsity`` records what training alone left.
    """

    name = "l1_dynamic"

    def __init__(self, amount: float = 0.4, bn_amount: float = 0.3, scope: str = "layerwise",
                 schedule: str = "paper", ramp: str = "linear", **kw):
        super().__init__(amount, bn_amount, scope, **kw)
        if schedule not in SCHEDULES:
            raise ConfigError(f"prune.schedule={schedule} must be one of {', '.join(SCHEDULES)}")
        if ramp not in RAMPS:
            raise ConfigError(f"prune.ramp={ramp} must be one of {', '.join(RAMPS)}")
        self.schedule, self.ramp = schedule, ramp
        self._epochs = 1

    def callbacks(self, ctx: Context) -> list:
        cfg = ctx.extras.get("cfg")
        self._epochs = int(cfg.trainer.max_epochs) if cfg is not None else 1
        if self.schedule == "paper":
            return [PaperDynamicPruning({k: a for k, a in self.amounts.items() if a > 0}, self.scope, self.importance),
                    SparsityLogger()]
        return [*(EpochStartPruning(KINDS[k], a, self.schedule, self.ramp, self.scope, self.importance)
                  for k, a in self.amounts.items() if a > 0), SparsityLogger()]

    def final_amounts(self) -> dict[str, float]:
        last = self._epochs - 1
        return {k: cumulative_sparsity(a, last, self._epochs, self.schedule, self.ramp) for k, a in self.amounts.items()}

    def after_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        make_permanent(net)
        fit = sparsity_metrics(net)
        ctx.log_metrics({self.key("fit_conv_sparsity"): fit[L1_CONV_SPARSITY],
                         self.key("fit_bn_sparsity"): fit[L1_BN_SPARSITY]})
        self.prune_all(net, self.final_amounts())  # zeros rank lowest: a no-op when the schedule completed
        return make_permanent(net)
