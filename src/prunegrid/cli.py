"""Command-line helpers: bad input ends in one line naming the fix, exit code 2."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from prunegrid.errors import PrunegridError


def fail(exc: BaseException) -> None:
    print(f"prunegrid: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
    sys.exit(2)


def precheck(argv: list[str]) -> None:
    """Check ``group=option`` overrides before Hydra composes anything."""
    from prunegrid.config import check_overrides

    try:
        check_overrides(a for a in argv if not a.startswith("-"))
    except PrunegridError as exc:
        fail(exc)


@contextmanager
def guard() -> Iterator[None]:
    """Turn :class:`PrunegridError` (also when raised inside a worker) into a one-line exit."""
    try:
        yield
    except PrunegridError as exc:
        fail(exc)
