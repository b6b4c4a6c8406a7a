"""Errors a user can act on. The CLI prints their message as one line, without a traceback."""


class DiffutronError(Exception):
    """Something went wrong at run time (exit code 1): bad file, unloadable model, ..."""

    exit_code = 1


class UsageError(DiffutronError):
    """The request itself is invalid (exit code 2): an option out of range, a missing placeholder."""

    exit_code = 2
