"""prunegrid: compare ways of making CNN image classifiers lighter, measured the same way."""

from prunegrid.errors import PrunegridError

__all__ = ["PrunegridError"]
__version__ = "0.1.0"
