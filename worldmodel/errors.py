"""The one error type a user sees as a single line, without a traceback."""


class WorldModelError(Exception):
    """A problem with the user's input or config: the message says what and what to do."""
