"""The World Models agent in the real env: frame → VAE → z, controller on [z, h] → action, MDN-RNN
updates h. Used by real-mode evolve workers, the final evaluation and the `controller` policy."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from worldmodel.checkpoints import load_module
from worldmodel.envs import preprocess
from worldmodel.models.controller import Controller
from worldmodel.models.mdnrnn import MDNRNN
from worldmodel.models.vae import VAE, to_input


def single_frame_inference() -> None:
    """Torch settings for a process that runs the agent one frame at a time on one core: one thread
    (more only fight the other workers) and no oneDNN, whose per-call set-up costs more than it saves on
    a single 64×64 frame (measured: 2.4 → 1.15 ms per agent step)."""
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False


def load_vae(path: Path | str) -> VAE:
    return load_module(VAE, path)


def load_rnn(path: Path | str) -> MDNRNN:
    return load_module(MDNRNN, path)


def load_controller(path: Path | str) -> Controller:
    return load_module(Controller, path)


class Agent:
    def __init__(self, vae: VAE, rnn: MDNRNN, controller: Controller) -> None:
        self.vae, self.rnn, self.controller = vae, rnn, controller
        self.params = controller.get_flat().unsqueeze(0)
        self.reset()

    def set_params(self, params: np.ndarray | torch.Tensor) -> None:
        self.params = torch.as_tensor(params, dtype=torch.float32).reshape(1, -1)

    def reset(self) -> None:
        self.state = self.rnn.initial_state(1)

    @torch.inference_mode()
    def act(self, frame: np.ndarray) -> np.ndarray:
        """A preprocessed uint8 frame (H, W, 3) → action; advances the MDN-RNN's memory."""
        z, _ = self.vae.encode(to_input(torch.from_numpy(frame).unsqueeze(0)))
        action = self.controller.act(self.params, z, self.state[0][0])
        self.state = self.rnn.advance(z, action, self.state)
        return action[0].numpy()

    @torch.inference_mode()
    def reconstruct(self, frame: np.ndarray) -> np.ndarray:
        mu, _ = self.vae.encode(to_input(torch.from_numpy(frame).unsqueeze(0)))
        return (self.vae.decode(mu)[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()


def play(
    env: gym.Env,
    agent: Agent,
    seed: int,
    max_steps: int,
    crop_bottom: int,
    image_size: int,
    record: bool = False,
) -> tuple[float, list[np.ndarray]]:
    """One real episode (stops at done); returns the total reward and, if `record`, frames with the
    VAE's reconstruction beside each."""
    obs, _ = env.reset(seed=seed)
    agent.reset()
    total, frames = 0.0, []
    for _ in range(max_steps):
        frame = preprocess(obs, crop_bottom, image_size)
        action = agent.act(frame)
        if record:
            frames.append(np.concatenate([frame, agent.reconstruct(frame)], axis=1))
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        if terminated or truncated:
            break
    return total, frames
