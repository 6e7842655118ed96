"""``prune=none``: the baseline cell every method is compared against, and its references.

With ``finetune_epochs: F`` and ``baseline_ckpt`` it is the equal-budget reference of a method
that fine-tunes a trained baseline for ``F`` epochs: the baseline trained on for ``F`` more
epochs, named ``none_ftF`` (:func:`prunegrid.budget.reference_name`).
"""

from prunegrid.budget import BASELINE
from prunegrid.pruning.base import PruningMethod


class NoPruning(PruningMethod):
    """Train and measure the backbone as it is."""

    name = BASELINE
