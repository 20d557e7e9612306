"""Rollouts inside the learned world: the MDN-RNN is the env, z_{t+1} is sampled from its mixture,
reward and done come from its heads. Pure torch, no I/O.

Every rollout draws its noise from its own seed, in chunks of steps, so a rollout gives the same
result whether it runs alone or batched with thousands of others (CMA-ES evaluates a whole
population × rollouts as one batch per step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from worldmodel.config import settings
from worldmodel.config.sections import DreamDone, Evolve
from worldmodel.models.controller import Controller
from worldmodel.models.mdnrnn import MDNRNN, Masks, sample_with_noise

NOISE_CHUNK = 50  # steps of noise drawn at a time per rollout


def initial_latents(
    mu: np.ndarray | None,
    logvar: np.ndarray | None,
    seeds: Sequence[int],
    latent: int = 0,
    z_kind: str = "sample",
) -> torch.Tensor:
    """One starting z per seed: a real initial frame's latent (picked by the seed), sampled from its
    posterior, or its mean (`z_kind="mean"`, agent.z); mu, logvar: (E, Z) latents of first frames.
    With mu = None, z ~ N(0, I) of size `latent` (the VAE's prior, as Dropout's Dream Land starts its
    dreams)."""
    size = latent if mu is None else mu.shape[1]
    out = np.empty((len(seeds), size), np.float32)
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng([int(seed), 0])
        if mu is None:
            out[i] = rng.standard_normal(size)
            continue
        e = rng.integers(len(mu))
        noise = rng.standard_normal(size)
        out[i] = mu[e] if z_kind == "mean" else mu[e] + np.exp(0.5 * logvar[e]) * noise
    return torch.from_numpy(out)


class _Noise:
    """Per-rollout noise drawn NOISE_CHUNK steps at a time: uniform and normal (N, Z) per step for z,
    uniform (N,) per step for a sampled done."""

    def __init__(self, seeds: Sequence[int], latent: int, device: torch.device | str = "cpu") -> None:
        # drawn on the CPU, where each rollout's generator lives, then moved: the same numbers anywhere
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.latent, self.device, self.t0, self.u, self.eps, self.u_done = latent, device, 0, None, None, None

    def dropout_masks(self, rnn: MDNRNN, rate: float) -> Masks:
        """One variational mask pair per rollout (on z and on the recurrent h), from its own generator."""
        pairs = [rnn.dropout_masks(1, rate, g) for g in self.gens]
        return torch.cat([z for z, _ in pairs]).to(self.device), torch.cat([h for _, h in pairs]).to(
            self.device
        )

    def at(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.u is None or t >= self.t0 + NOISE_CHUNK:
            self.t0 = t
            shape = (NOISE_CHUNK, self.latent)
            self.u = torch.stack([torch.rand(shape, generator=g) for g in self.gens], dim=1).to(self.device)
            self.eps = torch.stack([torch.randn(shape, generator=g) for g in self.gens], dim=1).to(
                self.device
            )
            u_done = torch.stack([torch.rand(NOISE_CHUNK, generator=g) for g in self.gens], dim=1)
            self.u_done = u_done.to(self.device)
        i = t - self.t0
        return self.u[i], self.eps[i], self.u_done[i]


@torch.inference_mode()
def dream_rollouts(
    rnn: MDNRNN,
    controller: Controller,
    params: torch.Tensor,
    z0: torch.Tensor,
    seeds: Sequence[int],
    max_steps: int,
    temperature: float,
    record: bool = False,
    dropout: float = 0.0,
    sample_done: bool = False,
    done_reward: float = 0.0,
    done_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run N dreams at once: params (N, n_params) (one controller per row), z0 (N, Z), one seed per row.
    Returns the total predicted reward per row (counted until the dream ends), and with `record` the
    latents visited (T, N, Z).

    `dropout` > 0 gives each rollout its own variational dropout masks on M (z and the recurrent h),
    held for the whole dream, so a controller cannot fit one model's quirks (Dropout's Dream Land). A
    dream ends when M predicts done: P(done) > `done_threshold`, or with `sample_done` a draw from
    Bernoulli(P(done)) at every step, P with the done loss's weight taken out. A dream that ends so,
    before `max_steps`, also earns `done_reward`: what the real env pays for that ending (CarRacing: −100
    for leaving the playfield), so that ending early does not pay."""
    n, device = z0.shape[0], z0.device  # M, the controller and z0 on one device (`device`)
    z, state = z0, rnn.initial_state(n, device)
    noise = _Noise(seeds, rnn.latent, device)
    masks = noise.dropout_masks(rnn, dropout) if dropout > 0 else None
    total = torch.zeros(n, device=device)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    zero, ending = torch.zeros((), device=device), torch.tensor(float(done_reward), device=device)
    visited = [] if record else None
    for t in range(max_steps):
        if record:
            visited.append(z)
        action = controller.act(params, z, state[0][0], state[1][0])
        out, state = rnn.step(z, action, state, masks)
        total += torch.where(alive, out.reward, zero)
        u, eps, u_done = noise.at(t)
        p_done = rnn.done_probability(out.done_logit)
        ends = alive & ((u_done < p_done) if sample_done else p_done > done_threshold)
        total += torch.where(ends, ending, zero)
        alive &= ~ends
        if not alive.any():
            break
        z = sample_with_noise(out.mixture, temperature, u, eps)
    return total, (torch.stack(visited) if record else None)


@dataclass(frozen=True)
class DreamSettings:
    """How a controller is scored inside the learned world (evolve's dream settings)."""

    max_steps: int
    temperature: float
    dropout: float = 0.0
    sample_done: bool = False
    done_reward: float = 0.0
    done_threshold: float = 0.5
    z: str = "sample"  # agent.z: how starting latents are read from real first frames

    @classmethod
    def of(cls, cfg: DictConfig) -> DreamSettings:
        """evolve's dream; a dreamed done earns `evolve.done_reward`, or by default the env's
        `terminal_reward`."""
        hp = settings(cfg, Evolve)
        done_reward = cfg.env.get("terminal_reward", 0.0) if hp.done_reward is None else hp.done_reward
        sample_done = hp.dream_done == DreamDone.sample
        return cls(
            hp.max_steps,
            hp.temperature,
            hp.dream_dropout,
            sample_done,
            float(done_reward),
            hp.done_threshold,
            str(cfg.agent.z),
        )


def dream_returns(
    rnn: MDNRNN,
    controller: Controller,
    solutions: np.ndarray,
    seeds: Sequence[int],
    starts: tuple[np.ndarray | None, np.ndarray | None],
    settings: DreamSettings,
) -> np.ndarray:
    """Dreamed returns (P, R) of each row of `solutions` (P, n_params) on each rollout seed, all P × R
    dreams in one batch (row c·R + r is candidate c on seed r). `starts`: first frames' (mu, logvar),
    or (None, None) for z ~ N(0, I)."""
    p, r = len(solutions), len(seeds)
    device = next(rnn.parameters()).device  # where M is, the dreams run (`device`)
    params = torch.from_numpy(np.asarray(solutions, np.float32)).repeat_interleave(r, dim=0).to(device)
    row_seeds = list(seeds) * p
    z0 = initial_latents(*starts, row_seeds, rnn.latent, settings.z).to(device)
    returns, _ = dream_rollouts(
        rnn,
        controller,
        params,
        z0,
        row_seeds,
        settings.max_steps,
        settings.temperature,
        dropout=settings.dropout,
        sample_done=settings.sample_done,
        done_reward=settings.done_reward,
        done_threshold=settings.done_threshold,
    )
    return returns.view(p, r).cpu().numpy()


def dream_fitness(*args, **kwargs) -> np.ndarray:
    """The mean of `dream_returns` over the seeds: one fitness per candidate."""
    return dream_returns(*args, **kwargs).mean(1)
