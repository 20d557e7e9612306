"""Rollouts inside the learned world: the MDN-RNN is the env, z_{t+1} is sampled from its mixture,
reward and done come from its heads. Pure torch, no I/O.

Every rollout draws its noise from its own seed, in chunks of steps, so a rollout gives the same
result whether it runs alone or batched with thousands of others (CMA-ES evaluates a whole
population × rollouts as one batch per step).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from worldmodel.models.controller import Controller
from worldmodel.models.mdnrnn import MDNRNN, sample_with_noise

NOISE_CHUNK = 50  # steps of noise drawn at a time per rollout


def initial_latents(mu: np.ndarray, logvar: np.ndarray, seeds: Sequence[int]) -> torch.Tensor:
    """One starting z per seed: a real initial frame's latent (picked by the seed), sampled from its
    posterior. mu, logvar: (E, Z) latents of first frames."""
    out = np.empty((len(seeds), mu.shape[1]), np.float32)
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng([int(seed), 0])
        e = rng.integers(len(mu))
        out[i] = mu[e] + np.exp(0.5 * logvar[e]) * rng.standard_normal(mu.shape[1])
    return torch.from_numpy(out)


class _Noise:
    """Per-rollout uniform and normal noise, (N, Z) per step, drawn NOISE_CHUNK steps at a time."""

    def __init__(self, seeds: Sequence[int], latent: int) -> None:
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.latent, self.t0, self.u, self.eps = latent, 0, None, None

    def at(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.u is None or t >= self.t0 + NOISE_CHUNK:
            self.t0 = t
            shape = (NOISE_CHUNK, self.latent)
            self.u = torch.stack([torch.rand(shape, generator=g) for g in self.gens], dim=1)
            self.eps = torch.stack([torch.randn(shape, generator=g) for g in self.gens], dim=1)
        return self.u[t - self.t0], self.eps[t - self.t0]


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run N dreams at once: params (N, n_params) (one controller per row), z0 (N, Z), one seed per row.
    Returns the total predicted reward per row (counted until the predicted done), and with `record`
    the latents visited (T, N, Z)."""
    n = z0.shape[0]
    z, state = z0, rnn.initial_state(n)
    noise = _Noise(seeds, rnn.latent)
    total = torch.zeros(n)
    alive = torch.ones(n, dtype=torch.bool)
    visited = [] if record else None
    for t in range(max_steps):
        if record:
            visited.append(z)
        action = controller.act(params, z, state[0][0])
        out, state = rnn.step(z, action, state)
        total += torch.where(alive, out.reward, torch.zeros(()))
        alive &= out.done_logit <= 0  # predicted P(done) > 0.5 ends the dream
        if not alive.any():
            break
        z = sample_with_noise(out.mixture, temperature, *noise.at(t))
    return total, (torch.stack(visited) if record else None)
