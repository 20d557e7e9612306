"""The learned world as a gymnasium env: play in the dream, or train another algorithm in it.

    env = gymnasium.make("worldmodel/Dream-v0", run_id="<a train_rnn run>")

M is the env. A step feeds (z, action) to the MDN-RNN, and its heads give the reward and the done. The
next z is drawn from its mixture at `temperature`. An episode starts from the latent of a real first
frame of M's training episodes, or from z ~ N(0, I) (`initial_z="normal"`). The options are evolve's
dream settings: temperature, variational `dropout` on M per episode, sampled or thresholded dones,
the reward of a dreamed done. Observations are z, [z, h] or the frame V decodes from z.
Every random draw comes from the seed given to `reset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from omegaconf import OmegaConf

from worldmodel.envs.pixels import ActionSpace
from worldmodel.models.mdnrnn import MDNRNN, sample_with_noise
from worldmodel.models.vae import VAE, to_frames

ID = "worldmodel/Dream-v0"
OBSERVATIONS = ("z", "zh", "frame")


class DreamEnv(gymnasium.Env):
    """A dream of one MDN-RNN, with the actions of the real env it learned from."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(
        self,
        rnn: MDNRNN,
        actions: ActionSpace,
        starts: tuple[np.ndarray, np.ndarray] | None = None,
        vae: VAE | None = None,
        observation: str = "z",
        max_steps: int = 1000,
        temperature: float = 1.0,
        dropout: float = 0.0,
        sample_done: bool = False,
        done_threshold: float = 0.5,
        done_reward: float = 0.0,
        render_mode: str | None = None,
    ) -> None:
        if observation not in OBSERVATIONS:
            raise ValueError(f"observation must be one of {OBSERVATIONS}, got {observation!r}")
        if (observation == "frame" or render_mode == "rgb_array") and vae is None:
            raise ValueError("a frame observation or rgb_array rendering needs the VAE")
        self.rnn, self.vae, self.actions, self.starts = rnn.eval(), vae, actions, starts
        self.observation, self.render_mode = observation, render_mode
        self.max_steps, self.temperature, self.dropout = max_steps, temperature, dropout
        self.sample_done, self.done_threshold, self.done_reward = sample_done, done_threshold, done_reward
        if actions.kind == "discrete":
            self.action_space = spaces.Discrete(actions.dim)
        else:
            self.action_space = spaces.Box(actions.low, actions.high, dtype=np.float32)
        if observation == "frame":
            size = vae.image_size
            self.observation_space = spaces.Box(0, 255, (size, size, 3), np.uint8)
        else:
            width = rnn.latent + (rnn.hidden if observation == "zh" else 0)
            self.observation_space = spaces.Box(-np.inf, np.inf, (width,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple:
        super().reset(seed=seed)
        self.gen = torch.Generator().manual_seed(int(self.np_random.integers(2**63)))
        self.t, self.state = 0, self.rnn.initial_state(1)
        self.masks = self.rnn.dropout_masks(1, self.dropout, self.gen) if self.dropout > 0 else None
        if self.starts is None:
            self.z = torch.randn(1, self.rnn.latent, generator=self.gen)
        else:
            mu, logvar = self.starts
            e = int(self.np_random.integers(len(mu)))
            noise = torch.randn(1, self.rnn.latent, generator=self.gen)
            self.z = (
                torch.from_numpy(mu[e : e + 1]) + torch.exp(0.5 * torch.from_numpy(logvar[e : e + 1])) * noise
            )
        return self._observe(), {}

    @torch.inference_mode()
    def step(self, action: Any) -> tuple:
        out, self.state = self.rnn.step(self.z, self._action(action), self.state, self.masks)
        reward = float(out.reward[0])
        p_done = float(self.rnn.done_probability(out.done_logit)[0])
        u = float(torch.rand((), generator=self.gen))
        terminated = u < p_done if self.sample_done else p_done > self.done_threshold
        reward += self.done_reward if terminated else 0.0
        shape = (1, self.rnn.latent)
        u_z, eps = torch.rand(shape, generator=self.gen), torch.randn(shape, generator=self.gen)
        self.z = sample_with_noise(out.mixture, self.temperature, u_z, eps)
        self.t += 1
        return self._observe(), reward, bool(terminated), self.t >= self.max_steps, {"p_done": p_done}

    def render(self) -> np.ndarray | None:
        return self._frame() if self.render_mode == "rgb_array" else None

    def _action(self, action: Any) -> torch.Tensor:
        if self.actions.kind == "discrete":
            return torch.nn.functional.one_hot(torch.tensor([int(action)]), self.actions.dim).float()
        return torch.as_tensor(np.asarray(action, np.float32).reshape(1, -1))

    @torch.inference_mode()
    def _frame(self) -> np.ndarray:
        return to_frames(self.vae.decode(self.z))[0]

    def _observe(self) -> np.ndarray:
        if self.observation == "frame":
            return self._frame()
        parts = [self.z] + ([self.state[0][0]] if self.observation == "zh" else [])
        return torch.cat(parts, dim=-1)[0].numpy().astype(np.float32)


def make_dream(
    run_id: str, tracking_uri: str | None = None, initial_z: str = "real", **settings: Any
) -> DreamEnv:
    """The dream of train_rnn run `run_id` (in `tracking_uri`, else MLflow's current store): its M, the
    VAE it was trained on, its env's actions, and first frames from its training episodes."""
    import mlflow

    from worldmodel import tracking
    from worldmodel.control.agent import load_rnn, load_vae

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    run = mlflow.get_run(run_id)
    rnn = load_rnn(tracking.checkpoint_path(run_id))
    vae = load_vae(tracking.checkpoint_path(tracking.upstream_run(run, "train_vae").info.run_id))
    encode_id = tracking.upstream_run(run, "encode").info.run_id
    starts = tracking.first_frames(encode_id, rnn.latent) if initial_z == "real" else None
    return DreamEnv(rnn, env_actions(run.data.tags["env"]), starts, vae, **settings)


def env_actions(env_id: str) -> ActionSpace:
    """The action space of the env config (`conf/env/*.yaml`) whose gymnasium id is `env_id`."""
    from worldmodel.config import CONFIG_DIR
    from worldmodel.envs.pixels import action_space

    for path in sorted(Path(CONFIG_DIR, "env").glob("*.yaml")):
        env = OmegaConf.load(path)
        if env.get("id") == env_id:
            return action_space(env)
    raise ValueError(f"no env config in {CONFIG_DIR / 'env'} has id {env_id!r}")


def register() -> None:
    if ID not in gymnasium.registry:
        gymnasium.register(ID, entry_point="worldmodel.envs.dream:make_dream")
