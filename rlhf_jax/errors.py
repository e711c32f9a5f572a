"""The one user-error base class.

Everything a user can get wrong (a gin file or binding, a setting out of range, a missing or
malformed data file, a busy or mismatched run directory) raises a subclass of `UserError`. The
CLI maps it to exit code 2 and one message without a traceback; any other exception is a bug
and keeps its traceback (exit code 1).
"""

from __future__ import annotations


class UserError(ValueError):
    """A user error: bad settings, bad files, a busy or mismatched run directory (exit 2).

    A `ValueError` so that callers that catch "bad input" generically keep working.
    """


class SettingsError(UserError):
    """A command-line or gin setting has the wrong type or is out of range."""


class GinConfigError(UserError):
    """A gin file or binding is wrong: unknown name, syntax error, missing file, a REQUIRED
    macro left unset, a macro used but never defined, or a misspelt macro."""


class RunDirMismatchError(UserError):
    """A run directory holds a different run (model, algorithm or data) than the one asked for."""
