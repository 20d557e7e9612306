"""The controller (C): [z, h] → action, parameters as one flat vector for CMA-ES. Pure torch, no I/O.

Linear by default (the paper: 867 parameters for z = 32, h = 256 and 3 actions), or with one tanh
hidden layer (`hidden_units`, the paper's 40-unit variant); `inputs="z"` drops h, and `inputs="zhc"`
adds the LSTM's cell state c (the paper's Doom controller read [z, h, c]). Box actions are
tanh-bounded into [low, high] (defaults: CarRacing's, steering in [-1, 1], gas and brake in [0, 1]):
a symmetric range scales tanh, any other takes (tanh + 1) / 2 onto it, and the dimensions in `clip`
take clip(tanh, low, high) instead (the paper's and Dropout's Dream Land's brake: a zero output is no
brake, where (tanh + 1) / 2 starts every candidate at half brake);
`discrete` actions are the one-hot argmax of logits. The first action's logit is fixed at 0 and the
layer outputs the others, as in multinomial logistic regression: only logit differences choose an
action, and the redundant half of a 2-action layer would only double the dimension CMA-ES searches.
With `axis` (an order of the actions), a discrete controller has one tanh output instead, cut into
equal bins over [-1, 1], bin k choosing action axis[k]: the paper's Doom controller, whose output
below −1/3 is left, above 1/3 right, and none between (axis [1, 0, 2] for noop, left, right).
`bias=False` drops the biases, as the paper's controllers have none: a candidate must then read its
inputs to act, where a bias alone can hold one action whatever it sees.

With `input_mean` and `input_std` (one value per input), inputs are standardised before the first
layer, as Augmented Random Search does for linear policies: CMA-ES's isotropic start then reaches every
input on an equal footing. On CartPole the weights a balancing policy needs on h are ~8× those on z.

`act` evaluates a whole batch of parameter vectors at once, one per row, which is how CMA-ES
candidates are evaluated together in the dream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MEMORY = {"z": 0, "zh": 1, "zhc": 2}  # controller inputs → how many hidden-sized vectors of M they read


class Controller(nn.Module):
    def __init__(
        self,
        latent: int,
        hidden: int,
        action_dim: int = 3,
        inputs: str = "zh",
        hidden_units: int = 0,
        low: list[float] | None = None,
        high: list[float] | None = None,
        discrete: bool = False,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        clip: list[int] | None = None,
        axis: list[int] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        # Without bounds: CarRacing's (checkpoints from before the env config carried them), else [-1, 1].
        self.low = (
            list(low) if low is not None else ([-1.0, 0.0, 0.0] if action_dim == 3 else [-1.0] * action_dim)
        )
        self.high = list(high) if high is not None else [1.0] * action_dim
        self.discrete = discrete
        self.clip = sorted(int(d) for d in clip or [])
        if any(not 0 <= d < action_dim for d in self.clip):
            raise ValueError(f"clip names action dimensions in [0, {action_dim}), got {self.clip}")
        if inputs not in MEMORY:
            raise ValueError(f"inputs must be one of {list(MEMORY)}, got {inputs!r}")
        self.axis = None if axis is None else [int(a) for a in axis]
        if self.axis is not None and not (discrete and sorted(self.axis) == list(range(action_dim))):
            raise ValueError(f"axis orders the {action_dim} discrete actions, got {self.axis}")
        self.bias = bool(bias)
        self.latent, self.hidden, self.action_dim = latent, hidden, action_dim
        out = 1 if self.axis is not None else action_dim - 1 if discrete else action_dim
        self.inputs, self.hidden_units = inputs, hidden_units
        self.in_dim = latent + MEMORY[inputs] * hidden
        if (input_mean is None) != (input_std is None):
            raise ValueError("input_mean and input_std come together")
        self.input_mean = None if input_mean is None else [float(v) for v in input_mean]
        self.input_std = None if input_std is None else [float(v) for v in input_std]
        if self.input_mean is not None and not len(self.input_mean) == len(self.input_std) == self.in_dim:
            raise ValueError(f"input_mean and input_std need {self.in_dim} values each")
        self._standardise = (
            None if self.input_mean is None else (torch.tensor(self.input_mean), torch.tensor(self.input_std))
        )
        self._bounds = torch.tensor(self.low), torch.tensor(self.high)
        self._clipped = torch.zeros(action_dim, dtype=torch.bool)
        self._clipped[self.clip] = True
        self._axis = None if self.axis is None else torch.tensor(self.axis)  # bin → action index
        widths = [self.in_dim, hidden_units, out] if hidden_units else [self.in_dim, out]
        self.shapes = []
        for a, b in zip(widths, widths[1:]):
            self.shapes += [(a, b), (b,)] if self.bias else [(a, b)]
        self.n_params = sum(int(torch.tensor(s).prod()) for s in self.shapes)
        self.flat = nn.Parameter(torch.zeros(self.n_params))

    @property
    def hparams(self) -> dict[str, int | str]:
        return {
            "latent": self.latent,
            "hidden": self.hidden,
            "action_dim": self.action_dim,
            "inputs": self.inputs,
            "hidden_units": self.hidden_units,
            "low": self.low,
            "high": self.high,
            "discrete": self.discrete,
            "input_mean": self.input_mean,
            "input_std": self.input_std,
            "clip": self.clip,
            "axis": self.axis,
            "bias": self.bias,
        }

    def step_scales(self, memory: float) -> torch.Tensor:
        """A scale per flat parameter: `memory` for the first layer's weights on M's memory (h, c), 1
        elsewhere. The (in, out) weight is stored row-major, so input row i is a run of `out` values."""
        rows, out = self.shapes[0]
        on_memory = (torch.arange(rows) >= self.latent).repeat_interleave(out)
        scales = torch.ones(self.n_params, dtype=torch.float64)
        scales[: rows * out][on_memory] = memory
        return scales

    def get_flat(self) -> torch.Tensor:
        return self.flat.detach().clone()

    def set_flat(self, vector: torch.Tensor) -> None:
        if vector.shape != (self.n_params,):
            raise ValueError(f"expected {self.n_params} parameters, got {tuple(vector.shape)}")
        with torch.no_grad():
            self.flat.copy_(vector)

    def _unpack(self, params: torch.Tensor) -> list[torch.Tensor]:
        out, i = [], 0
        for shape in self.shapes:
            n = math.prod(shape)  # plain ints: torch.export traces this module (the registered agent)
            out.append(params[:, i : i + n].reshape(params.shape[0], *shape))
            i += n
        return out

    def inputs_of(
        self, z: torch.Tensor, h: torch.Tensor | None, c: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What this controller reads, before standardisation: z, [z, h] or [z, h, c]."""
        return torch.cat([z, h, c][: 1 + MEMORY[self.inputs]], dim=-1)

    def act(
        self,
        params: torch.Tensor,
        z: torch.Tensor,
        h: torch.Tensor | None,
        c: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """params (N, n_params), z (N, Z), h and c (N, H): M's memory → actions (N, action_dim)."""
        x = self.inputs_of(z, h, c)
        if self._standardise is not None:
            x = (x - self._standardise[0]) / self._standardise[1]
        layers = self._unpack(params)
        weights, biases = (layers[0::2], layers[1::2]) if self.bias else (layers, [0.0] * len(layers))
        for i, (w, b) in enumerate(zip(weights, biases)):
            x = torch.bmm((torch.tanh(x) if i else x).unsqueeze(1), w).squeeze(1) + b
        raw = x
        if self._axis is not None:
            n = self.action_dim
            k = ((torch.tanh(raw[:, 0]) + 1) / 2 * n).floor().clamp(0, n - 1).long()
            return F.one_hot(self._axis[k], n).to(raw.dtype)
        if self.discrete:
            logits = torch.cat([torch.zeros_like(raw[:, :1]), raw], dim=-1)
            return F.one_hot(logits.argmax(-1), self.action_dim).to(raw.dtype)
        squashed = torch.tanh(raw)
        low, high = self._bounds
        # A symmetric range scales tanh; any other maps [-1, 1] onto [low, high], or clips to it.
        mapped = torch.where(low == -high, squashed * high, low + (squashed + 1) / 2 * (high - low))
        return torch.where(self._clipped, torch.maximum(torch.minimum(squashed, high), low), mapped)

    def forward(
        self, z: torch.Tensor, h: torch.Tensor | None = None, c: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This controller's own parameters on a batch of inputs."""
        return self.act(self.flat.expand(z.shape[0], -1), z, h, c)
