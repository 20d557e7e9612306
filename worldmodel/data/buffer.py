"""Seed 002's ring buffer, holding whole episodes: `capacity` slots, the oldest overwritten first, and
training windows sampled from whatever it holds. Memory is bounded by the capacity, never by the
dataset.

A window lies within one stored episode, so it never joins two episodes; inside a stored episode (data
collected with `reset_on_done`) it may cross a done, which the MDN-RNN's loss masks. `sample` draws
window starts uniformly, with replacement; `epoch` covers what the buffer holds once, without overlap.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class EpisodeBuffer:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be ≥ 1, got {capacity}")
        self.capacity = capacity
        self.slots: list[dict[str, np.ndarray] | None] = [None] * capacity
        self.next = 0  # the slot the next episode goes to: the oldest once full
        self.size = 0
        self.added = 0

    def add(self, episode: dict[str, np.ndarray], length: int) -> None:
        """An episode's arrays, each (T, ...) with `length` valid steps; overwrites the oldest when full."""
        self.slots[self.next] = {k: v[:length] for k, v in episode.items()}
        self.next = (self.next + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.added += 1

    def episodes(self) -> list[dict[str, np.ndarray]]:
        """What the buffer holds, oldest first."""
        order = (
            range(self.next, self.next + self.capacity) if self.size == self.capacity else range(self.size)
        )
        return [self.slots[i % self.capacity] for i in order]

    def epoch(self, batch: int, span: int, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        """Batches of every window of `span` steps that tiles each held episode from a random offset,
        in a random order: each step is seen at most once (sampling with replacement leaves about a
        third of the windows out of an epoch)."""
        held = self.slots[: self.size]
        index = []
        for e, ep in enumerate(held):
            length = len(next(iter(ep.values())))
            offset = int(rng.integers(0, length % span + 1)) if length >= span else 0
            index += [(e, s) for s in range(offset, length - span + 1, span)]
        if not index:
            raise ValueError(f"no stored episode has {span} steps")
        order = np.array(index)[rng.permutation(len(index))]
        for i in range(0, len(order), batch):
            picks = order[i : i + batch]
            yield {k: np.stack([held[e][k][s : s + span] for e, s in picks]) for k in held[0]}

    def sample(self, batch: int, span: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`batch` windows of `span` consecutive steps, each array (batch, span, ...)."""
        held = self.slots[: self.size]
        starts = np.array([max(0, len(next(iter(ep.values()))) - span + 1) for ep in held])
        total = int(starts.sum())
        if total == 0:
            raise ValueError(f"no stored episode has {span} steps")
        picks = rng.integers(0, total, batch)
        ends = np.cumsum(starts)
        which = np.searchsorted(ends, picks, side="right")
        offsets = picks - (ends - starts)[which]
        return {k: np.stack([held[e][k][s : s + span] for e, s in zip(which, offsets)]) for k in held[0]}
