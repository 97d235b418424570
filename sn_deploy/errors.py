"""Errors that reach users as one line (the CLIs print them and exit 2, no traceback)."""


class SnDeployError(Exception):
    """Base class of every error caused by user input or environment, not by a bug."""


class InputError(SnDeployError):
    """Bad user input: a file, a shape, an option value."""


class OutputError(SnDeployError, OSError):
    """An output cannot be written: full disk, read-only file system, no permission.

    Also an OSError, so that code catching the original error still catches it."""
