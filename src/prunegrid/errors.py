"""Errors that reach the user as one line naming the fix."""


class PrunegridError(Exception):
    """Bad input or environment: the message is one line that says what to change."""


class ConfigError(PrunegridError):
    """A config value is invalid (unknown option, out-of-range number, ...)."""


class DataError(PrunegridError):
    """The data set cannot be used as configured (missing dir, empty class, bad image)."""
