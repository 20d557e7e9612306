"""The one error type a user sees as a single line, without a traceback."""

from __future__ import annotations


class WorldModelError(Exception):
    """A problem with the user's input or config: the message says what and what to do."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (for quoting inside a WorldModelError), at most `limit` chars."""
    return " ".join(str(err).split())[:limit] or err.__class__.__name__
