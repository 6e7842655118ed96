"""The one interface every lightening method implements, on a plain ``nn.Module``.

A method is built from ``conf/prune/<name>.yaml``. The pipeline calls, in order:
``check`` (before any work), ``before_fit`` (change the model before training),
``callbacks`` (Lightning callbacks during training), ``after_fit`` (change the trained
model), then fine-tunes for ``finetune_epochs`` if the method asks for it, and finally
``report`` (the method's own metrics; artifacts go through ``ctx.log_artifact``). Every hook
does nothing by default, so ``none`` is a method too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import DataLoader

from prunegrid.errors import ConfigError


@dataclass
class Context:
    """What a method may use, without knowing about Lightning or MLflow.

    ``fit(net, epochs, callbacks=())`` trains and returns the net (for fine-tuning);
    ``evaluate(net, split, max_batches=None)`` returns ``{"acc", "loss"}``;
    ``loader(split, shuffle=None)`` gives batches of transformed images.
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


def check_fraction(name: str, value: float, low_open: bool = False) -> None:
    """Amounts live in [0, 1) (or (0, 1) with ``low_open``); anything else is a config error."""
    if value is None or not ((0 < value < 1) if low_open else (0 <= value < 1)):
        rng = "(0, 1)" if low_open else "[0, 1)"
        raise ConfigError(f"prune.{name}={value} must be in {rng}")


class PruningMethod:
    """Base class: every hook is a no-op.

    Args:
        baseline_ckpt: a saved final model of the matching ``prune=none`` cell; when given,
            the main training is skipped and the method starts from that model.
        finetune_epochs: epochs of training after ``after_fit`` (0: none).
        from_baseline: the method lightens a *trained* baseline (after_fit); the grid then passes the
            matching ``prune=none`` cell's model as ``baseline_ckpt`` instead of training it again.
    """

    name = "none"

    def __init__(self, baseline_ckpt: str | None = None, finetune_epochs: int = 0, from_baseline: bool = False):
        if finetune_epochs is None or finetune_epochs < 0:
            raise ConfigError(f"prune.finetune_epochs={finetune_epochs} must be 0 or more")
        self.baseline_ckpt = baseline_ckpt or None
        self.finetune_epochs = int(finetune_epochs)
        self.from_baseline = bool(from_baseline)

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

    def report(self, net: nn.Module, ctx: Context) -> dict[str, float]:
        return {}
