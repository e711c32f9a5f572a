"""The data pipeline's error types.

`DataError` is raised for anything wrong with the data itself (a missing or malformed field, an
unreadable file, a row that would produce an empty training target); its message names the file,
the row index and the field. `TokenizerError` is raised when a tokenizer file is missing or
unreadable. Both subclass `rlhf_jax.errors.UserError` (a `ValueError`): the CLI reports them
with exit code 2 and one message.
"""

from __future__ import annotations

from rlhf_jax.errors import UserError


class DataError(UserError):
    """Bad data: the message names the source, the row index and the field where they apply."""


class TokenizerError(UserError):
    """A tokenizer file is missing, unreadable or lacks a required special token."""
