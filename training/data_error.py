"""The one error type of data preparation (`codefill data ...`): bad input files, records or arguments."""

from __future__ import annotations

from codefill.errors import CodefillError


class DataError(CodefillError, ValueError):
    """Input that data preparation cannot use; the message names the file, record and offending value."""
