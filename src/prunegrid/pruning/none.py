"""``prune=none``: the baseline cell every method is compared against."""

from prunegrid.pruning.base import PruningMethod


class NoPruning(PruningMethod):
    """Train and measure the backbone as it is."""

    name = "none"
