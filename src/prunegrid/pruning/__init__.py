"""Lightening methods, one module each, all behind :class:`~prunegrid.pruning.base.PruningMethod`."""

from prunegrid.pruning.base import Context, PruningMethod

__all__ = ["Context", "PruningMethod"]
