"""Seed streams: every random stream of the project derives from (`seed`, stream, ...) here, so two
streams never share seeds (evaluation tracks are never training tracks)."""

from __future__ import annotations

import numpy as np

# stream ids: the second element of every key
TRAIN = 1  # evolve: training rollouts (generation, rollout)
EVAL = 2  # evaluate and evolve's final evaluation: unseen tracks (episode)
CHECK = 3  # evolve, dream mode: real checks of the generation's best (generation, rollout)
DREAM = 4  # dream stage: free dreams (episode)
ROUND = 6  # pipeline rounds: the seed of round k's new episodes (round)
NORM = 7  # evolve.normalize: the calibration rollouts (rollout), and their parameters
FIDELITY = 8  # dream.mode=fidelity: real tracks (0, track), dreams (1, rollout), random candidates (2)
ROUND_RANDOM = 9  # pipeline rounds: the seed of round k's random linear episodes (round)


def seed_of(*key: int) -> int:
    """A 32-bit seed from a key of integers, e.g. seed_of(cfg.seed, TRAIN, generation, rollout)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])
