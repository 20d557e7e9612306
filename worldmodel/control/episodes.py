"""One episode of a policy in the env: the unit of work of the collect workers.

Episode i is seeded from (seed, i) alone, so a dataset does not depend on how episodes are split
between workers or machines.
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig, OmegaConf

from worldmodel.control.policies import make_policy
from worldmodel.data.rollouts import Episode, pack
from worldmodel.envs.pixels import PixelEnv, make_env

_ENVS: dict[str, PixelEnv] = {}  # one env per process and env config, reused across episodes


def episode_seeds(seed: int, index: int) -> tuple[int, np.random.Generator]:
    """The env's reset seed and the policy's generator for episode `index`."""
    env_ss, policy_ss = np.random.SeedSequence([seed, index]).spawn(2)
    return int(env_ss.generate_state(1)[0]), np.random.default_rng(policy_ss)


def run_episode(cfg: DictConfig, index: int) -> Episode:
    key = OmegaConf.to_yaml(cfg.env)
    if key not in _ENVS:
        _ENVS[key] = make_env(cfg.env)
    env = _ENVS[key]
    steps, size = int(cfg.collect.max_steps), int(cfg.env.image_size)
    reset_on_done = bool(cfg.collect.reset_on_done)
    env_seed, rng = episode_seeds(int(cfg.seed), index)
    policy = make_policy(cfg.policy, env.space, rng)

    images = np.zeros((steps, size, size, 3), np.uint8)
    actions = np.zeros((steps, env.space.dim), np.float32)
    rewards = np.zeros(steps, np.float32)
    dones = np.ones(steps, bool)  # padding after an early end counts as done
    frame = env.reset(seed=env_seed, state=policy.start_state())
    length = steps
    for t in range(steps):
        images[t] = frame
        actions[t] = policy.act(frame, t)
        frame, rewards[t], terminated, truncated = env.step(actions[t])
        # M's done head learns how the world ends an episode; a time limit is the clock, not the world
        # (a done learned from it ends dreams at random, and the dream pays −100 for it). A record with
        # resets marks every cut, as the next step is a new track.
        dones[t] = terminated or (truncated and reset_on_done)
        if terminated or truncated:
            if not reset_on_done:
                length = t + 1
                break
            # seed 000: keep going on a new track, the done flag marks the cut
            frame = env.reset(state=policy.start_state())
            policy.new_track()
    return Episode(images, actions, rewards, dones, length, index)


def init_worker(cfg: dict) -> DictConfig:
    """WorkerPool init: the config travels as a plain dict."""
    return OmegaConf.create(cfg)


def episode_task(cfg: DictConfig, index: int) -> Episode:
    return pack(run_episode(cfg, index))  # compressed here, in the worker, not by the shard writer
