"""Training budgets: what a final model cost, and the equal-budget reference it is compared with.

A relative figure is only honest between models trained for the same total epochs. Every run
records the training that shaped its final weights (the baseline's included when the cell
started from it) as ``budget/epochs`` and ``budget/images``. A method that fine-tunes a trained
baseline for ``F`` epochs is compared with ``prune=none`` trained on for the same ``F`` epochs
from the same baseline: the *reference* cell :func:`reference_name` names.

This module stays light (no torch): the grid's resolvers import it in every Hydra process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

BASELINE = "none"
"""The one spelling of the baseline method's name (``conf/prune/none.yaml``)."""

EPOCHS, IMAGES, CONVERGED, TRAIN_TOTAL_S = "budget/epochs", "budget/images", "train/converged", "time/train_total_s"
TAG_REF_PRUNE = "ref_prune"


def reference_name(finetune_epochs: int | None) -> str:
    """The cell name of ``prune=none`` fine-tuned ``finetune_epochs`` more epochs from its baseline.

    ``0`` is the baseline itself (``none``); ``1`` is ``none_ft1``, and so on.
    """
    n = int(finetune_epochs or 0)
    if n < 0:
        raise ValueError(f"finetune_epochs={n} must be 0 or more")
    return BASELINE if n == 0 else f"{BASELINE}_ft{n}"


def is_baseline_family(prune: str) -> bool:
    """``none`` and its fine-tuned references (``none_ft1``, ...)."""
    return prune == BASELINE or (prune.startswith(f"{BASELINE}_ft") and prune[len(BASELINE) + 3:].isdigit())


@dataclass
class Budget:
    """All training that shaped a model: epochs, images seen, wall seconds, and whether early
    stopping (rather than the epoch cap) ended its main fit."""

    epochs: int = 0
    images: int = 0
    train_s: float = 0.0
    converged: int = 0

    def add(self, epochs: int, images: int, seconds: float) -> None:
        self.epochs += int(epochs)
        self.images += int(images)
        self.train_s += float(seconds)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Budget":
        data = data or {}
        return cls(**{k: type(getattr(cls(), k))(data[k]) for k in cls().as_dict() if k in data})

    def metrics(self) -> dict[str, float]:
        return {EPOCHS: float(self.epochs), IMAGES: float(self.images), CONVERGED: float(self.converged),
                TRAIN_TOTAL_S: float(self.train_s)}
