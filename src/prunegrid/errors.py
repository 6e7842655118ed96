"""Errors that reach the user as one line naming the fix."""


class PrunegridError(Exception):
    """Bad input or environment: the message is one line that says what to change."""


class ConfigError(PrunegridError):
    """A config value is invalid (unknown option, out-of-range number, ...)."""


class DataError(PrunegridError):
    """The data set cannot be used as configured (missing dir, empty class, bad image)."""


def one_line(exc: BaseException, limit: int = 500) -> str:
    """``Type: first line of the message``, for a tag or a warning that records why a step was skipped."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:limit]
