"""The one base of every error a user may see: bad input, files or environment, not a bug.

Each boundary of codefill (config, checkpoint files, tokenizer, wire, workers, training data, the CLI...)
has one error type, a subclass of `CodefillError`; the CLI prints any of them as one `codefill: error: ...`
line and exits with status 2, and lets anything else keep its traceback. A subclass registers itself when
its class statement runs, so `registered()` lists every boundary error type of the modules imported so far
(the tests check that the known boundaries are there).
"""

from __future__ import annotations

_REGISTRY: list[type[CodefillError]] = []


class CodefillError(Exception):
    """Base of the boundary errors; messages name the offending values."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY.append(cls)


def registered() -> tuple[type[CodefillError], ...]:
    """Every CodefillError subclass defined so far, in definition order."""
    return tuple(_REGISTRY)
