"""gymnasium's view: the pixel envs as wrappers, and the learned world as an env (`worldmodel/Dream-v0`)."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from tests.conftest import compose_config
from worldmodel import tracking
from worldmodel.envs.pixels import gym_env


@pytest.mark.parametrize("env", ["carracing", "cartpole", "doom"])
def test_each_pixel_env_is_a_gymnasium_env_of_frames(env):
    if env == "doom":
        pytest.importorskip("vizdoom")
    cfg = compose_config(f"env={env}").env
    wrapped = gym_env(cfg)
    try:
        check_env(wrapped, skip_render_check=True)
        frame, _ = wrapped.reset(seed=0)
        assert frame.shape == (cfg.image_size, cfg.image_size, 3) and frame.dtype == np.uint8
        assert isinstance(wrapped, gymnasium.Wrapper) and wrapped.observation_space.contains(frame)
    finally:
        wrapped.close()


@pytest.fixture()
def dream(smoke, rnn_run):
    tracking.setup(smoke())

    def make(**settings):
        return gymnasium.make("worldmodel/Dream-v0", run_id=rnn_run, disable_env_checker=True, **settings)

    return make


@pytest.mark.parametrize("observation", ["z", "zh", "frame"])
def test_the_dream_passes_gymnasiums_env_checker(dream, observation):
    env = dream(observation=observation, max_steps=20, render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=False)
    obs, _ = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    assert env.render().shape == (64, 64, 3)


def play(env, seed: int, policy) -> tuple[list[float], list[np.ndarray], bool]:
    obs, _ = env.reset(seed=seed)
    rewards, seen, done = [], [obs], False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        rewards.append(reward)
        seen.append(obs)
        done = terminated or truncated
    return rewards, seen, terminated


def test_a_dream_is_the_same_for_the_same_seed_and_differs_for_another(dream):
    env = dream(observation="zh", max_steps=30, temperature=1.0, dropout=0.1, sample_done=True)
    gas = np.array([0.0, 1.0, 0.0], np.float32)
    a, b, c = (play(env, seed, lambda obs: gas) for seed in (3, 3, 4))
    np.testing.assert_array_equal(np.stack(a[1]), np.stack(b[1]))
    assert a[0] == b[0] and a[0] != c[0]
    assert all(np.isfinite(a[0])) and len(a[0]) <= 30
    assert a[1][0].shape == (env.unwrapped.rnn.latent + env.unwrapped.rnn.hidden,)


def test_the_readme_example_trains_a_policy_in_the_dream(dream):
    env = dream(observation="zh", max_steps=30, temperature=0.5)
    rng = np.random.default_rng(0)
    low, high = env.action_space.low, env.action_space.high

    def score(w: np.ndarray) -> float:
        return sum(play(env, 0, lambda obs: np.clip(np.tanh(w @ obs), low, high).astype(np.float32))[0])

    best = np.zeros((env.action_space.shape[0], env.observation_space.shape[0]), np.float32)
    start = score(best)
    for _ in range(10):  # hill climbing: keep a perturbation that dreams better
        trial = best + 0.1 * rng.standard_normal(best.shape).astype(np.float32)
        if score(trial) > score(best):
            best = trial
    assert score(best) >= start
