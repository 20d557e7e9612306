"""Progress bars that behave in a terminal and in a log file alike.

On a terminal, tqdm as usual. Anywhere else (a Slurm or CI log, `> file`, a test), one plain line at
most every `LOG_EVERY_S` seconds, and the last one at the end: tqdm's carriage returns would otherwise
make the whole run one giant line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

LOG_EVERY_S = 30.0


class _Lines:
    """A stream for tqdm that turns each redraw into a line of its own and drops line clearing."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, sparse and line by line when stderr is not a terminal."""
    if not sys.stderr.isatty():
        kwargs = {
            "file": _Lines(sys.stderr),
            "mininterval": LOG_EVERY_S,
            "ascii": True,
            "ncols": 100,
        } | kwargs
    return tqdm(iterable, **kwargs)
