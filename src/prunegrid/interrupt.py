"""SIGINT and SIGTERM end the work as :class:`Interrupted`, never as a finished run.

Within :func:`signals` (``train.py``, the sweep and the grid's cells run under it), either signal
raises :class:`Interrupted` in the main thread. It is a ``BaseException`` but not a
``KeyboardInterrupt``: Lightning turns a ``KeyboardInterrupt`` into a graceful stop followed by
whatever comes next (the test, the measurements), and ``except Exception`` handlers must not
swallow it. The MLflow run then ends KILLED with the signal in ``status_detail`` and the process
exits ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), as a shell does.

Code that must not be cut in half (writing a checkpoint, ending a run) runs under
:func:`deferred`: a signal that arrives there is raised when the block ends.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict = {"depth": 0, "pending": None}


class Interrupted(BaseException):
    """The process received SIGINT or SIGTERM; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum: int, _frame) -> None:
    if _state["depth"]:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


@contextmanager
def signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (main thread only; the
    previous handlers come back after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a signal that arrives within the block; raise it as :class:`Interrupted` when the
    block ends (the outermost block, when nested)."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        pending = _state["pending"] if _state["depth"] == 0 else None
        if pending is not None:
            _state["pending"] = None
            raise Interrupted(pending)
