"""Seed 002's ring buffer of episodes: capacity, overwrite order, windows within one episode, uniform."""

from __future__ import annotations

import numpy as np
import pytest

from worldmodel.data.buffer import EpisodeBuffer


def episode(tag: int, length: int) -> dict[str, np.ndarray]:
    """Steps labelled (episode tag, step) so that a window shows where it came from."""
    steps = np.arange(length)
    return {"tag": np.full(length, tag), "step": steps, "x": np.stack([steps, steps], 1).astype(np.float32)}


def test_capacity_and_overwrite_order():
    buffer = EpisodeBuffer(3)
    for tag in range(5):
        buffer.add(episode(tag, 10), 10)
        assert buffer.size == min(tag + 1, 3)
    assert [int(ep["tag"][0]) for ep in buffer.episodes()] == [2, 3, 4], "the oldest go first"
    assert buffer.added == 5


def test_valid_length_only():
    buffer = EpisodeBuffer(2)
    buffer.add(episode(0, 10), 4)  # padded after step 4
    assert len(buffer.episodes()[0]["step"]) == 4
    with pytest.raises(ValueError, match="no stored episode has 5 steps"):
        buffer.sample(1, 5, np.random.default_rng(0))


def test_windows_never_cross_episodes_and_keep_their_shape():
    buffer = EpisodeBuffer(4)
    for tag, length in enumerate([7, 30, 12, 9]):
        buffer.add(episode(tag, length), length)
    w = buffer.sample(500, 6, np.random.default_rng(1))
    assert w["x"].shape == (500, 6, 2) and w["x"].dtype == np.float32
    assert np.all(w["tag"] == w["tag"][:, :1]), "one episode per window"
    assert np.all(np.diff(w["step"], axis=1) == 1), "consecutive steps"


def test_every_window_start_is_equally_likely():
    buffer = EpisodeBuffer(3)
    lengths = [5, 20, 11]
    for tag, length in enumerate(lengths):
        buffer.add(episode(tag, length), length)
    span, draws = 4, 60_000
    w = buffer.sample(draws, span, np.random.default_rng(2))
    starts = [(t, s) for t, length in enumerate(lengths) for s in range(length - span + 1)]
    counts = {k: 0 for k in starts}
    for t, s in zip(w["tag"][:, 0], w["step"][:, 0]):
        counts[(int(t), int(s))] += 1
    expected = draws / len(starts)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 2 * len(starts), f"χ² {chi2:.1f} for {len(starts) - 1} degrees of freedom"
    assert min(counts.values()) > 0


def test_same_seed_same_windows():
    buffer = EpisodeBuffer(2)
    buffer.add(episode(0, 50), 50)
    a = buffer.sample(8, 5, np.random.default_rng(3))
    b = buffer.sample(8, 5, np.random.default_rng(3))
    np.testing.assert_array_equal(a["step"], b["step"])


def test_an_epoch_tiles_each_episode_once_from_a_random_offset():
    buffer = EpisodeBuffer(4)
    lengths = [7, 30, 12, 3]  # the last is shorter than a window
    for tag, length in enumerate(lengths):
        buffer.add(episode(tag, length), length)
    span = 5
    batches = list(buffer.epoch(4, span, np.random.default_rng(4)))
    assert [len(b["tag"]) for b in batches] == [4, 4, 1], "1 + 6 + 2 + 0 windows, the last batch as it falls"
    w = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert np.all(w["tag"] == w["tag"][:, :1]) and np.all(np.diff(w["step"], axis=1) == 1)
    for tag, length in enumerate(lengths):
        starts = np.sort(w["step"][w["tag"][:, 0] == tag, 0])
        assert len(starts) == length // span, "as many windows as fit"
        assert np.all(np.diff(starts) == span), "no overlap, no gap"
        assert len(starts) == 0 or starts[0] <= length % span
    offsets = set()
    for seed in range(40):
        w = next(buffer.epoch(30, span, np.random.default_rng(seed)))
        offsets.add(int(w["step"][w["tag"][:, 0] == 2, 0].min()))
    assert offsets == {0, 1, 2}, "12 steps hold two windows of 5 from offset 0, 1 or 2"


def test_an_epoch_is_shuffled_and_seeded():
    buffer = EpisodeBuffer(2)
    buffer.add(episode(0, 200), 200)
    buffer.add(episode(1, 200), 200)
    first = [b["step"][:, 0] for b in buffer.epoch(8, 10, np.random.default_rng(5))]
    again = [b["step"][:, 0] for b in buffer.epoch(8, 10, np.random.default_rng(5))]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    assert not np.all(np.diff(np.concatenate(first)) > 0), "not in file order"
