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


def initial_latents(
    mu: np.ndarray | None, logvar: np.ndarray | None, seeds: Sequence[int], latent: int = 0
) -> torch.Tensor:
    """One starting z per seed: a real initial frame's latent (picked by the seed), sampled from its
    posterior; mu, logvar: (E, Z) latents of first frames. With mu = None, z ~ N(0, I) of size `latent`
    (the VAE's prior, as Dropout's Dream Land starts its dreams)."""
    size = latent if mu is None else mu.shape[1]
    out = np.empty((len(seeds), size), np.float32)
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng([int(seed), 0])
        if mu is None:
            out[i] = rng.standard_normal(size)
            continue
        e = rng.integers(len(mu))
        out[i] = mu[e] + np.exp(0.5 * logvar[e]) * rng.standard_normal(size)
    return torch.from_numpy(out)


class _Noise:
    """Per-rollout noise drawn NOISE_CHUNK steps at a time: uniform and normal (N, Z) per step for z,
    uniform (N,) per step for a sampled done."""

    def __init__(self, seeds: Sequence[int], latent: int) -> None:
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.latent, self.t0, self.u, self.eps, self.u_done = latent, 0, None, None, None

    def dropout_mask(self, hidden: int, rate: float) -> torch.Tensor:
        """One mask (N, H) per rollout, scaled by 1/(1 − rate), from the rollout's own generator."""
        keep = torch.stack([torch.rand(hidden, generator=g) for g in self.gens]) >= rate
        return keep.float() / (1 - rate)

    def at(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.u is None or t >= self.t0 + NOISE_CHUNK:
            self.t0 = t
            shape = (NOISE_CHUNK, self.latent)
            self.u = torch.stack([torch.rand(shape, generator=g) for g in self.gens], dim=1)
            self.eps = torch.stack([torch.randn(shape, generator=g) for g in self.gens], dim=1)
            self.u_done = torch.stack([torch.rand(NOISE_CHUNK, generator=g) for g in self.gens], dim=1)
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run N dreams at once: params (N, n_params) (one controller per row), z0 (N, Z), one seed per row.
    Returns the total predicted reward per row (counted until the dream ends), and with `record` the
    latents visited (T, N, Z).

    `dropout` > 0 gives each rollout its own dropout mask on M, held for the whole dream, so a
    controller cannot fit one model's quirks (Dropout's Dream Land). A dream ends when M predicts done:
    P(done) > 0.5, or with `sample_done` a draw from Bernoulli(P(done)) at every step."""
    n = z0.shape[0]
    z, state = z0, rnn.initial_state(n)
    noise = _Noise(seeds, rnn.latent)
    mask = noise.dropout_mask(rnn.hidden, dropout) if dropout > 0 else None
    total = torch.zeros(n)
    alive = torch.ones(n, dtype=torch.bool)
    visited = [] if record else None
    for t in range(max_steps):
        if record:
            visited.append(z)
        action = controller.act(params, z, state[0][0])
        out, state = rnn.step(z, action, state, mask)
        total += torch.where(alive, out.reward, torch.zeros(()))
        u, eps, u_done = noise.at(t)
        p_done = torch.sigmoid(out.done_logit)
        alive &= ~(u_done < p_done) if sample_done else p_done <= 0.5
        if not alive.any():
            break
        z = sample_with_noise(out.mixture, temperature, u, eps)
    return total, (torch.stack(visited) if record else None)
