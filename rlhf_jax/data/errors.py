"""The data pipeline's error types.

`DataError` is raised for anything wrong with the data itself (a missing or malformed field, an
unreadable file, a row that would produce an empty training target); its message names the file,
the row index and the field. `TokenizerError` is raised when a tokenizer file is missing or
unreadable. Both subclass `ValueError` so callers that only care about "bad input" can catch one
type.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad data: the message names the source, the row index and the field where they apply."""


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or lacks a required special token."""
