"""Command-line helpers: bad input ends in one line naming the fix, exit code 2.

Every entry point parses with :class:`ArgumentParser` (``--help`` as usual; a usage mistake is one line
``prunegrid: error: ...`` on stderr and exit code 2, no usage dump) and runs its work under :func:`guard`
(a :class:`PrunegridError` or a bad Hydra override ends the same way, no stack trace)::

    def main(argv=None):
        args = ArgumentParser(prog="python -m prunegrid.x", description="...").parse_args(argv)
        with guard():
            ...

A ``main`` that returns its exit code (``prunegrid.data.crops``, ``prunegrid.data.gan``) returns
:func:`error_line` for an error that :func:`is_user_error` accepts instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn

from prunegrid.errors import PrunegridError

EXIT_USAGE = 2
# Hydra's errors about the overrides themselves (bad syntax, unknown key, missing config option); not
# InstantiationException, which wraps errors raised by our own code.
HYDRA_USER_ERRORS = ("ConfigCompositionException", "OverrideParseException", "MissingConfigException")


def message(exc: BaseException | str) -> str:
    """One line: the first paragraph of the message (at most two lines, joined), else the exception's type.

    An error raised in a DataLoader worker arrives as "Caught DataError in DataLoader worker process 0."
    followed by the worker's traceback; its message is the traceback's last line.
    """
    text = str(exc).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    first = text.split("\n\n")[0].splitlines()[:2] if text else []
    return " ".join(line.strip() for line in first) or type(exc).__name__


def error_line(exc: BaseException | str) -> int:
    """Print ``prunegrid: error: <message>`` on stderr; return the exit code (2), for a ``main`` that returns it."""
    print(f"prunegrid: error: {message(exc)}", file=sys.stderr)
    return EXIT_USAGE


def fail(exc: BaseException | str) -> NoReturn:
    """:func:`error_line`, then exit with code 2."""
    sys.exit(error_line(exc))


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line and exit 2 (``--help`` unchanged)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def key_value(text: str) -> str:
    """argparse ``type`` of a ``key=value`` override (OmegaConf dotlist): a usage error unless it reads as one."""
    from omegaconf import OmegaConf

    key, sep, _ = text.partition("=")
    try:
        ok = bool(sep and key.strip(".") and OmegaConf.from_dotlist([text]))
    except Exception:  # the value is not YAML (e.g. an unclosed [ )
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"'{text}' is not key=value with a YAML value")
    return text


def is_user_error(exc: BaseException) -> bool:
    """A :class:`PrunegridError`, or Hydra's complaint about an override (not an error of our own code)."""
    if isinstance(exc, PrunegridError):
        return True
    hydra_errors = sys.modules.get("hydra.errors")  # not imported: the error cannot be Hydra's
    return hydra_errors is not None and isinstance(
        exc, tuple(getattr(hydra_errors, name) for name in HYDRA_USER_ERRORS if hasattr(hydra_errors, name)))


class JobExit(Exception):
    """What :func:`guard` raises instead of exiting when it runs in a Ray task (a job of Hydra's Ray
    launcher): ``sys.exit`` there kills the Ray worker, and Ray runs the task again. As an ``Exception``
    it ends the job as a failed ``JobReturn`` instead. ``code``: the exit code; ``line``: the message."""

    def __init__(self, code: int, line: str = ""):
        super().__init__(code, line)
        self.code, self.line = int(code), line

    def __str__(self) -> str:
        return self.line or f"exit {self.code}"


def in_ray_task() -> bool:
    """This process is a Ray worker (it runs Ray tasks), not a driver."""
    if "ray" not in sys.modules:
        return False
    try:
        from ray._private.worker import WORKER_MODE, global_worker
    except ImportError:
        return False
    return global_worker.mode == WORKER_MODE


def _exit(code: int, line: str) -> NoReturn:
    if in_ray_task():
        raise JobExit(code, line) from None
    sys.exit(code)


@contextmanager
def guard() -> Iterator[None]:
    """Turn a user error (:func:`is_user_error`, also when raised inside a worker) into a one-line exit 2,
    and SIGINT/SIGTERM (:class:`~prunegrid.interrupt.Interrupted`) into one line and exit ``128 + signal``
    (in a Ray task, :class:`JobExit` instead of the exit)."""
    from prunegrid.interrupt import Interrupted

    try:
        yield
    except Interrupted as exc:
        print(f"prunegrid: {exc}; the run is KILLED and its checkpoints are kept (continue it with resume=true)",
              file=sys.stderr)
        _exit(exc.exit_code, str(exc))
    except Exception as exc:
        if not is_user_error(exc) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _exit(error_line(exc), message(exc))
