"""The MDN-RNN (M): an LSTM on [z_t, a_t] predicting a mixture of Gaussians for each dimension of
z_{t+1}, the reward r_t and whether the episode ends (a logit). Pure torch, no I/O.

The mixture NLL is computed in log space with log-sum-exp and clamped log-sigmas, so extreme inputs
give large but finite losses (public implementations are known to produce NaN or −1e22 here).

Dropout is variational, as in Dropout's Dream Land (Gal & Ghahramani's recurrent dropout): one mask per
sequence on the z input and one on the recurrent h inside the LSTM, held for every step, in training
and, with a mask per rollout, in a dream. The action is never dropped.

The done head is trained with `done_pos_weight` on the rare done steps, whose optimum is the logit of
P(done) plus log(weight); `done_probability` takes that back out, so a sampled done is not drawn ~weight×
too often.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

LOG_SIGMA_MIN, LOG_SIGMA_MAX = -7.0, 5.0
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

State = tuple[torch.Tensor, torch.Tensor]
Masks = tuple[torch.Tensor, torch.Tensor]  # on z (B, Z) and on the recurrent h (B, H), scaled by 1/(1 − p)


@dataclass
class Mixture:
    log_pi: torch.Tensor  # (..., Z, K), log-softmax over K
    mu: torch.Tensor  # (..., Z, K)
    log_sigma: torch.Tensor  # (..., Z, K)


@dataclass
class MDNOutput:
    mixture: Mixture
    reward: torch.Tensor  # (...,)
    done_logit: torch.Tensor  # (...,)


class MDNRNN(nn.Module):
    def __init__(
        self,
        latent: int,
        action_dim: int = 3,
        hidden: int = 256,
        mixtures: int = 5,
        dropout: float = 0.0,
        done_pos_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.latent, self.action_dim, self.hidden, self.mixtures = latent, action_dim, hidden, mixtures
        self.dropout = dropout  # variational, on z and the recurrent h, in training
        self.done_pos_weight = done_pos_weight  # what the done head was trained with
        self.lstm = nn.LSTM(latent + action_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 3 * latent * mixtures + 2)

    @property
    def hparams(self) -> dict[str, int | float]:
        return {
            "latent": self.latent,
            "action_dim": self.action_dim,
            "hidden": self.hidden,
            "mixtures": self.mixtures,
            "dropout": self.dropout,
            "done_pos_weight": self.done_pos_weight,
        }

    def done_probability(self, done_logit: torch.Tensor) -> torch.Tensor:
        """P(done), with the done loss's weight taken out of the logit."""
        return torch.sigmoid(done_logit - math.log(self.done_pos_weight))

    def dropout_masks(self, batch: int, rate: float, generator: torch.Generator | None = None) -> Masks:
        """One variational mask per sequence: on z (batch, Z) and on the recurrent h (batch, H)."""
        keep = torch.rand(batch, self.latent + self.hidden, generator=generator) >= rate
        masks = keep.float() / (1 - rate)
        return masks[:, : self.latent], masks[:, self.latent :]

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        zeros = torch.zeros(1, batch, self.hidden, device=device)
        return zeros, zeros.clone()

    def _heads(self, h: torch.Tensor) -> MDNOutput:
        out = self.head(h)
        zk = self.latent * self.mixtures
        shape = (*h.shape[:-1], self.latent, self.mixtures)
        logits, mu, log_sigma = out[..., :zk], out[..., zk : 2 * zk], out[..., 2 * zk : 3 * zk]
        mixture = Mixture(
            F.log_softmax(logits.reshape(shape), dim=-1),
            mu.reshape(shape),
            log_sigma.reshape(shape).clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX),
        )
        return MDNOutput(mixture, out[..., -2], out[..., -1])

    def forward(
        self,
        z: torch.Tensor,
        a: torch.Tensor,
        state: State | None = None,
        masks: Masks | None = None,
        resets: torch.Tensor | None = None,
    ) -> tuple[MDNOutput, torch.Tensor, State]:
        """Sequences z (B, T, Z), a (B, T, A) → predictions for every step, hidden states h (B, T, H).
        With `masks` (variational dropout, one pair per sequence, from `dropout_masks`) or `resets`
        (B, T) bool (the memory starts afresh before those steps: a new life, as the paper's restart
        flag) the LSTM runs step by step; without, as one nn.LSTM call."""
        if masks is None and resets is None:
            h, state = self.lstm(torch.cat([z, a], dim=-1), state)
            return self._heads(h), h, state
        state = state or self.initial_state(z.shape[0], z.device)
        lstm = self.lstm
        # The input half of the gates for every step at once; the recurrence step by step.
        x = torch.cat([z if masks is None else z * masks[0].unsqueeze(1), a], dim=-1)
        inputs = F.linear(x, lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)
        keep = (~resets).to(z.dtype).unsqueeze(-1).unbind(1) if resets is not None else None
        hs = []
        for t, step in enumerate(inputs.unbind(1)):  # one backward for all steps, not T full-size ones
            if keep is not None:
                state = (state[0] * keep[t], state[1] * keep[t])  # (1, B, H) × (B, 1)
            state = self._cell(step, state, None if masks is None else masks[1])
            hs.append(state[0][0])
        h = torch.stack(hs, dim=1)
        return self._heads(h), h, state

    def step(
        self, z: torch.Tensor, a: torch.Tensor, state: State, masks: Masks | None = None
    ) -> tuple[MDNOutput, State]:
        """One step for the controller and the dream: z (B, Z), a (B, A) → predictions, new state.
        The new hidden h is `state[0][0]`. `masks` (from `dropout_masks`) drop z and the recurrent h:
        a dream holds one pair per rollout, a fresh world model each time."""
        state = self.advance(z, a, state, masks)
        return self._heads(state[0][0]), state

    def advance(self, z: torch.Tensor, a: torch.Tensor, state: State, masks: Masks | None = None) -> State:
        """The memory update alone (what an agent in the real env needs: h, not the predictions).

        The LSTM cell is written out with the nn.LSTM's own weights: for a single step it is ~6× faster
        than calling nn.LSTM (whose per-call overhead dominates), and agrees with it to float rounding."""
        lstm = self.lstm
        if masks is not None:
            z = z * masks[0]
        gates = torch.addmm(
            lstm.bias_ih_l0 + lstm.bias_hh_l0, torch.cat([z, a], dim=-1), lstm.weight_ih_l0.t()
        )
        return self._cell(gates, state, None if masks is None else masks[1])

    def _cell(self, input_gates: torch.Tensor, state: State, h_mask: torch.Tensor | None) -> State:
        """input_gates: x W_ih + biases (B, 4H); the recurrent h is dropped by `h_mask` inside the cell."""
        h, c = state[0][0], state[1][0]
        gates = torch.addmm(input_gates, h if h_mask is None else h * h_mask, self.lstm.weight_hh_l0.t())
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h.unsqueeze(0), c.unsqueeze(0)


def mixture_log_prob(m: Mixture, target: torch.Tensor) -> torch.Tensor:
    """log p(target) per latent dimension: target (..., Z) → (..., Z)."""
    t = target.unsqueeze(-1)
    log_n = -0.5 * ((t - m.mu) * torch.exp(-m.log_sigma)).pow(2) - m.log_sigma - _HALF_LOG_2PI
    return torch.logsumexp(m.log_pi + log_n, dim=-1)


@dataclass
class MDNLoss:
    loss: torch.Tensor
    nll: torch.Tensor  # mixture NLL per latent dimension, mean over unmasked steps
    reward: torch.Tensor  # MSE
    done: torch.Tensor  # BCE with logits


def mdn_loss(
    out: MDNOutput,
    next_z: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    reward_weight: float = 1.0,
    done_weight: float = 1.0,
    mask: torch.Tensor | None = None,
    done_pos_weight: float = 1.0,
    reward_mask: torch.Tensor | None = None,
) -> MDNLoss:
    """Loss over (B, T) steps. `mask` (B, T) excludes steps whose next z is not predictable (the step
    after a done is a fresh track) from the NLL. `done_pos_weight` weighs the rare done steps in the done
    head's loss (the paper weighted them 10× for Doom). `reward_mask` (B, T) keeps steps out of the
    reward loss (the done steps, when the env declares what an ending pays and the dream adds it)."""
    nll = -mixture_log_prob(out.mixture, next_z).mean(-1)
    if mask is not None:
        nll = (nll * mask).sum() / mask.sum().clamp(min=1)
    else:
        nll = nll.mean()
    if reward_mask is None:
        r = F.mse_loss(out.reward, reward)
    else:
        r = ((out.reward - reward) ** 2 * reward_mask).sum() / reward_mask.sum().clamp(min=1)
    pos_weight = torch.tensor(float(done_pos_weight), device=done.device)
    d = F.binary_cross_entropy_with_logits(out.done_logit, done.float(), pos_weight=pos_weight)
    return MDNLoss(nll + reward_weight * r + done_weight * d, nll, r, d)


def sample_with_noise(m: Mixture, temperature: float, u: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Draw z from the mixture (..., Z, K) → (..., Z) given uniform `u` and normal `eps` noise (..., Z).

    The temperature flattens the component weights and widens each Gaussian by √τ (the paper's
    sampling); τ = 0 gives the most likely component's mean. Taking the noise as input lets a batch of
    dreams draw exactly what each would draw alone."""
    if temperature <= 0:
        k = m.log_pi.argmax(-1, keepdim=True)
        return m.mu.gather(-1, k).squeeze(-1)
    cdf = torch.softmax(m.log_pi / temperature, dim=-1).cumsum(-1)
    k = (cdf < u.unsqueeze(-1)).sum(-1, keepdim=True).clamp(max=m.mu.shape[-1] - 1)
    mu, log_sigma = m.mu.gather(-1, k).squeeze(-1), m.log_sigma.gather(-1, k).squeeze(-1)
    return mu + eps * torch.exp(log_sigma) * math.sqrt(temperature)


def sample(m: Mixture, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw z from the mixture (..., Z, K) → (..., Z) with noise from `generator`."""
    shape = m.mu.shape[:-1]
    u = torch.rand(shape, generator=generator).to(m.mu.device)
    eps = torch.randn(shape, generator=generator).to(m.mu.device)
    return sample_with_noise(m, temperature, u, eps)


class MDNRNNStep(nn.Module):
    """The MDN-RNN's one-step interface with plain tensors in and out, as torch.export needs:
    (z, a, h, c) → (log_pi, mu, log_sigma, reward, done_logit, h, c)."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, z: torch.Tensor, a: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple:
        out, (h, c) = self.rnn.step(z, a, (h.unsqueeze(0), c.unsqueeze(0)))
        m = out.mixture
        return m.log_pi, m.mu, m.log_sigma, out.reward, out.done_logit, h[0], c[0]
