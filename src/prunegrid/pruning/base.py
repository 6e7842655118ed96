"""The one interface every lightening method implements, on a plain ``nn.Module``.

A method is built from ``conf/prune/<name>.yaml``. The pipeline calls, in order:
``check`` (before any work), ``before_fit`` (change the model before training),
``callbacks`` (Lightning callbacks during training), ``after_fit`` (change the trained
model), then fine-tunes for ``finetune_epochs`` if the method asks for it, ``to_onnx`` (the
model ONNX Runtime should time; by default the final model exported as it is), and finally
``report`` (the method's own metrics; artifacts go through ``ctx.log_artifact``); ``explained``
names the model Grad-CAM draws when the final one has no gradients. Every hook
does nothing by default, so ``none`` is a method too.

What a method needs from a backbone is declared once, by ``requires`` (capabilities of the
net's :class:`~prunegrid.models.net.Contract`: BatchNorm, Conv2d, FX-traceable, removable
units); :meth:`PruningMethod.serves` rejects a backbone that lacks one, in one line, before any
training. Methods read only what the contract declares (``prunegrid.models.net.DECLARED``).

Whether a method lightens a *trained* baseline is declared once, by the class attribute
``from_baseline``; the pipeline, the grid and ``dvc.yaml`` take it from there. The pipeline is
one sequence: train (or load) the baseline, or let the method shape training from scratch;
apply the method (``after_fit``); fine-tune for ``finetune_epochs``.

Controls (Blalock et al., "What is the State of Neural Network Pruning?", MLSys 2020; Liu et al.,
"Rethinking the Value of Network Pruning", ICLR 2019) are options of the methods themselves, listed in
:data:`CONTROLS` as the method options they set, and offered by a method through ``controls``:
``random`` ranks at random (``importance: random``) with everything else unchanged; ``scratch``
(Scratch-E, ``reinit: true``) re-initialises the pruned architecture and trains it from scratch for as
many epochs as the pruned-and-fine-tuned model had in all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from torch import nn
from torch.utils.data import DataLoader

from prunegrid import measure
from prunegrid.budget import BASELINE, reference_name
from prunegrid.errors import ConfigError
from prunegrid.models.net import CAPABILITIES, Net
from prunegrid.strength import CONTROLS, RANDOM, control_of  # noqa: F401  (RANDOM: the methods' random importance)


@dataclass
class Context:
    """What a method may use, without knowing about Lightning or MLflow.

    ``fit(net, epochs, callbacks=())`` fine-tunes the net (the fine-tuning recipe, all epochs) and returns it;
    ``evaluate(net, split, max_batches=None)`` returns ``{"acc", "loss"}``;
    ``loader(split, shuffle=None)`` gives batches of transformed images; ``loss`` is the cell's
    configured loss (``loss(logits, targets)``).
    """

    num_classes: int
    input_size: int
    seed: int
    fit: Callable[..., nn.Module]
    evaluate: Callable[..., dict[str, float]]
    loader: Callable[..., DataLoader]
    log_metrics: Callable[[dict[str, float]], None]
    log_artifact: Callable[[Path, str | None], None]
    artifact_dir: Path
    extras: dict[str, Any] = field(default_factory=dict)
    loss: Callable | None = None


def check_fraction(name: str, value: float, low_open: bool = False) -> None:
    """Amounts live in [0, 1) (or (0, 1) with ``low_open``); anything else is a config error."""
    if value is None or not ((0 < value < 1) if low_open else (0 <= value < 1)):
        rng = "(0, 1)" if low_open else "[0, 1)"
        raise ConfigError(f"prune.{name}={value} must be in {rng}")


class PruningMethod:
    """Base class: every hook is a no-op.

    Class attributes:
        name: the method's label and, unless ``namespace`` is set, its metric namespace (:meth:`key`).
        requires: capabilities of the backbone contract the method needs (:meth:`serves`).
        from_baseline: ``True`` when the method lightens a *trained* baseline (in ``after_fit``): the
            pipeline trains a plain baseline first, or loads ``baseline_ckpt``, and the grid runs the
            method in the stage that reuses the ``prune=none`` cell's model. ``False`` when the
            method shapes training itself (``before_fit``, ``callbacks``) from scratch.
        structural: ``True`` when ``after_fit`` changes the architecture (channels removed, layers cut):
            the pipeline then recalibrates BatchNorm statistics before fine-tuning (``bn_recalibration``).
        controls: the :data:`CONTROLS` the method offers (``random``: it has a random importance;
            ``scratch``: it is structural, so its architecture can be trained from scratch).

    Args:
        baseline_ckpt: a saved final model of the matching ``prune=none`` cell; when given,
            the main training is skipped and the method starts from that model.
        finetune_epochs: epochs of training after ``after_fit`` (0: none). Fine-tuning runs exactly
            this many epochs (no early stopping), so budgets add up.
        reinit: Scratch-E (structural methods only): after ``after_fit``, re-initialise every weight of
            the new architecture and train it with the main recipe for the baseline's epochs plus
            ``finetune_epochs``, instead of fine-tuning the pruned weights.
    """

    name = BASELINE
    namespace: ClassVar[str | None] = None
    from_baseline: ClassVar[bool] = False
    structural: ClassVar[bool] = False
    requires: tuple[str, ...] = ()
    controls: ClassVar[tuple[str, ...]] = ()

    def __init__(self, baseline_ckpt: str | None = None, finetune_epochs: int = 0, reinit: bool = False):
        if finetune_epochs is None or finetune_epochs < 0:
            raise ConfigError(f"prune.finetune_epochs={finetune_epochs} must be 0 or more")
        if reinit and not self.structural:
            raise ConfigError(f"prune.reinit=true (Scratch-E) re-trains a pruned architecture; prune={self.name} "
                              "keeps the architecture, so there is none to re-train")
        self.baseline_ckpt = baseline_ckpt or None
        self.finetune_epochs = int(finetune_epochs)
        self.reinit = bool(reinit)

    @property
    def control(self) -> str | None:
        """Which control of :data:`CONTROLS` this configuration is (``None``: the method itself)."""
        return control_of({k: getattr(self, k, None) for sets in CONTROLS.values() for k in sets})

    @property
    def reference(self) -> str:
        """The equal-budget ``prune=none`` cell this method's accuracy is compared with: the baseline
        fine-tuned for the same ``finetune_epochs`` (scratch methods train the baseline's epochs)."""
        return reference_name(self.finetune_epochs)

    def key(self, metric: str) -> str:
        """The method's own metric namespace, ``<namespace>/<metric>`` (``namespace``: the method's
        ``name`` unless methods of one family share one, as the two L1 timings share ``l1``)."""
        return f"{self.namespace or self.name}/{metric}"

    def serves(self, net: nn.Module) -> None:
        """Reject, in one line, a backbone whose contract lacks a capability in ``requires``."""
        if not isinstance(net, Net) or net.contract is None:
            raise ConfigError(f"prune={self.name} needs a prunegrid Net with a declared contract, got "
                              f"{type(net).__name__}; build the backbone from conf/backbone")
        missing = net.contract.missing(self.requires)
        if missing:
            raise ConfigError(f"prune={self.name} cannot serve backbone {net.arch}: it needs "
                              f"{' and '.join(CAPABILITIES[m] for m in missing)}; use another prune method")

    def check(self, net: nn.Module, ctx: Context) -> None:
        """Validate options against the model and data before any training."""

    def before_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        return net

    def callbacks(self, ctx: Context) -> list:
        return []

    def after_fit(self, net: nn.Module, ctx: Context) -> nn.Module:
        return net

    def finetune_callbacks(self, ctx: Context) -> list:
        return []

    def to_onnx(self, net: nn.Module, input_size: int, path: str | Path) -> Path:
        """The final model as ONNX Runtime runs it (default: ``net`` exported as it is)."""
        return measure.export_onnx(net, input_size, path)

    def explained(self, net: nn.Module) -> tuple[nn.Module, str | None]:
        """The model Grad-CAM should explain, and what it is when it is not the final model
        (default: the final model itself, ``None``)."""
        return net, None

    def report(self, net: nn.Module, ctx: Context) -> dict[str, float]:
        return {}
