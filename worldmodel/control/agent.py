"""The World Models agent in the real env: frame → VAE → z, controller on [z, h] → action, MDN-RNN
updates h. Used by real-mode evolve workers, `stage=evaluate` and the `controller` policy.

The agent reads z as the VAE's mean μ, or as a sample from its posterior (`agent.z=sample`, as the
paper's code and Dropout's Dream Land do, so C and M see in the real env what they see in the dream); each
row's noise comes from its own generator, seeded by its episode.

An agent drives `slots` envs in lockstep with one batched V → C → M forward per step over the envs
still running. Torch's CPU kernels round differently for different batch sizes, so a rollout's result
depends (in the last float bits, and so after many steps in its trajectory) on the rollouts it shares a
batch with: callers group rollouts by position alone, never by worker count, and replay a whole batch to
reproduce one of its episodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from worldmodel.config import settings
from worldmodel.config.sections import Evolve
from worldmodel.envs.pixels import ActionSpace, PixelEnv, action_space
from worldmodel.errors import WorldModelError
from worldmodel.models.checkpoints import load_module
from worldmodel.models.controller import Controller
from worldmodel.models.mdnrnn import MDNRNN
from worldmodel.models.vae import VAE, to_frames, to_input


def worker_inference() -> None:
    """Torch settings for a process that runs the agent on one core: one thread (more only fight the
    other workers) and no oneDNN, whose per-call set-up costs more than it saves on a handful of 64×64
    frames (measured: 2.4 → 1.15 ms per single-frame agent step)."""
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False


@contextlib.contextmanager
def single_core() -> Iterator[None]:
    """`worker_inference`'s settings for a while, then back: an agent that acts in the stage's own
    process computes what it computes in a worker, to the bit."""
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    worker_inference()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn


def load_vae(path: Path | str) -> VAE:
    return load_module(VAE, path)


def load_rnn(path: Path | str) -> MDNRNN:
    return load_module(MDNRNN, path)


def load_controller(path: Path | str, space: ActionSpace) -> Controller:
    """A saved controller, checked against the actions (`space`) of the env it is to act in."""
    controller = load_module(Controller, path)
    if (controller.action_dim, controller.discrete) != (space.dim, space.kind == "discrete"):
        kind = "discrete" if controller.discrete else "box"
        raise WorldModelError(
            f"{path}: this controller acts with {controller.action_dim}-d {kind} actions but the env takes "
            f"{space.dim}-d {space.kind} ones; use a controller evolved on this env"
        )
    return controller


def controller_for(cfg: DictConfig, rnn: MDNRNN) -> Controller:
    """A new controller (all zeros) for M's latent and memory and the env's actions, shaped by the
    evolve settings (`evolve.inputs`, `hidden`, `clip_actions`, `discrete_axis`, `bias`)."""
    hp, space = settings(cfg, Evolve), action_space(cfg.env)
    if rnn.action_dim != space.dim:
        raise WorldModelError(
            f"this MDN-RNN takes {rnn.action_dim}-d actions but env={cfg.env.name} has {space.dim}; "
            "train M on this env's data"
        )
    return new_controller(
        rnn, space, hp.inputs.value, hp.hidden, clip=hp.clip_actions, axis=hp.discrete_axis, bias=hp.bias
    )


def new_controller(
    rnn: MDNRNN,
    space: ActionSpace,
    inputs: str = "zh",
    hidden: int = 0,
    clip: Sequence[int] = (),
    axis: Sequence[int] | None = None,
    bias: bool = True,
) -> Controller:
    """A new controller (all zeros) on M's latent and memory, acting in `space`: the one place that maps
    an action space to a Controller's bounds (a box's `clip` dims, a discrete space's bin `axis`)."""
    box = space.kind == "box"
    return Controller(
        rnn.latent,
        rnn.hidden,
        rnn.action_dim,
        inputs,
        hidden,
        low=space.low.tolist(),
        high=space.high.tolist(),
        discrete=not box,
        clip=list(clip) if box else None,
        axis=None if box or axis is None else list(axis),
        bias=bias,
    )


Z_KINDS = ("mean", "sample")


class Agent:
    """V, M and C acting for `slots` envs at once; row i of every batch belongs to env i."""

    def __init__(
        self, vae: VAE, rnn: MDNRNN, controller: Controller, slots: int = 1, z: str = "mean"
    ) -> None:
        if z not in Z_KINDS:
            raise ValueError(f"z must be one of {Z_KINDS}, got {z!r}")
        self.vae, self.rnn, self.controller, self.slots, self.z = vae, rnn, controller, slots, z
        self.set_params(controller.get_flat().expand(slots, -1))

    def set_params(self, params: np.ndarray | torch.Tensor) -> None:
        """One parameter vector per row (n ≤ slots rows; the rest are zeros), or one for all."""
        params = torch.as_tensor(np.asarray(params), dtype=torch.float32).reshape(
            -1, self.controller.n_params
        )
        if len(params) == 1:
            params = params.expand(self.slots, -1)
        self.params = torch.zeros(self.slots, self.controller.n_params)
        self.params[: len(params)] = params
        self.reset()

    def reset(self, seeds: Sequence[int] | None = None) -> None:
        """A fresh memory for every row; row i's z noise (agent.z=sample) from seeds[i] (default i)."""
        self.state = self.rnn.initial_state(self.slots)
        seeds = list(seeds or []) + list(range(len(seeds or []), self.slots))
        self.noise = [torch.Generator().manual_seed(int(s)) for s in seeds]
        # per row, what the controller read: [count, Σx, Σx²] (evolve.normalize's statistics)
        self.tally = np.zeros((self.slots, 1 + 2 * self.controller.in_dim))

    @torch.inference_mode()
    def act(self, frames: np.ndarray, rows: Sequence[int] | None = None) -> np.ndarray:
        """Preprocessed uint8 frames (n, H, W, 3) of the envs `rows` (default: all slots) → actions (n, A);
        advances those rows' memory."""
        picked = slice(None) if rows is None else np.asarray(rows)
        rows = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        h, c = self.state[0][:, rows], self.state[1][:, rows]
        z, logvar = self.vae.encode(to_input(torch.from_numpy(frames)))
        if self.z == "sample":
            ids = range(self.slots)[picked] if isinstance(picked, slice) else picked
            eps = torch.stack([torch.randn(z.shape[1], generator=self.noise[i]) for i in ids])
            z = z + eps * torch.exp(0.5 * logvar)
        x = self.controller.inputs_of(z, h[0], c[0]).double().numpy()
        self.tally[picked] += np.concatenate([np.ones((len(x), 1)), x, x * x], axis=1)
        action = self.controller.act(self.params[rows], z, h[0], c[0])
        h, c = self.rnn.advance(z, action, (h, c))
        self.state[0][:, rows], self.state[1][:, rows] = h, c
        return action.numpy()

    @torch.inference_mode()
    def reconstruct(self, frames: np.ndarray) -> np.ndarray:
        mu, _ = self.vae.encode(to_input(torch.from_numpy(frames)))
        return to_frames(self.vae.decode(mu))


class AgentStep(torch.nn.Module):
    """V, M and C as one step with plain tensors in and out, as torch.export needs: uint8 frames
    (B, H, W, 3), M's h and c (B, H) → the action (B, A) and the new h and c. V reads the mean latent.
    Start an episode with zeros for h and c."""

    def __init__(self, vae: VAE, rnn: MDNRNN, controller: Controller) -> None:
        super().__init__()
        self.vae, self.rnn, self.controller = vae, rnn, controller

    def forward(self, frames: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple:
        z, _ = self.vae.encode(to_input(frames))
        action = self.controller(z, h, c)
        h, c = self.rnn.advance(z, action, (h.unsqueeze(0), c.unsqueeze(0)))
        return action, h[0], c[0]


def standardisation(tally: np.ndarray, floor: float = 1e-2) -> tuple[list[float], list[float]]:
    """Mean and std (at least `floor`) of controller inputs from a summed tally [count, Σx, Σx²]."""
    n, total, squares = tally[0], tally[1 : (len(tally) + 1) // 2], tally[(len(tally) + 1) // 2 :]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    return mean.tolist(), np.maximum(std, floor).tolist()


@dataclass
class Rollout:
    """One real episode's outcome. `stalled`: cut short after `stall_steps` steps without progress."""

    score: float
    steps: int
    stalled: bool = False
    rewards: list[float] = field(default_factory=list)  # per step: a replay of a prefix checks against them
    frames: list[np.ndarray] = field(default_factory=list)  # real | reconstruction, when recorded
    inputs: np.ndarray | None = None  # the controller's inputs, summed: [count, Σx, Σx²]


def play(
    envs: Sequence[PixelEnv],
    agent: Agent,
    seeds: Sequence[int],
    max_steps: int,
    stall_steps: int = 0,
    record: int = 0,
) -> list[Rollout]:
    """Play len(seeds) ≤ agent.slots episodes in lockstep, episode i on envs[i] from `reset(seed=seeds[i])`
    with the agent's row i; each stops at done or after `max_steps`. With `stall_steps` > 0 an episode
    also stops after that many steps without a positive reward (in CarRacing, no new tile): a training
    shortcut, never used to score. The first `record` frames of each episode are kept, with the VAE's
    reconstruction beside each."""
    n = len(seeds)
    if n > agent.slots or n > len(envs):
        raise ValueError(f"{n} episodes for {agent.slots} agent slots and {len(envs)} envs")
    frames = np.stack([envs[i].reset(seed=int(seed)) for i, seed in enumerate(seeds)])
    agent.reset(seeds)
    out = [Rollout(0.0, 0) for _ in seeds]
    idle = [0] * n  # steps since the last positive reward
    active = list(range(n))
    for t in range(max_steps):
        actions = agent.act(frames[active], active)
        if t < record:
            recon = agent.reconstruct(frames[active])
            for k, i in enumerate(active):
                out[i].frames.append(np.concatenate([frames[i], recon[k]], axis=1))
        for k, i in enumerate(list(active)):
            frame, reward, terminated, truncated = envs[i].step(actions[k])
            out[i].score += reward
            out[i].steps += 1
            out[i].rewards.append(reward)
            idle[i] = 0 if reward > 0 else idle[i] + 1
            out[i].stalled = bool(stall_steps) and idle[i] >= stall_steps and not (terminated or truncated)
            if terminated or truncated or out[i].stalled:
                active.remove(i)
                out[i].inputs = agent.tally[i].copy()
            else:
                frames[i] = frame
        if not active:
            break
    for i in active:
        out[i].inputs = agent.tally[i].copy()
    return out
