"""Dream fidelity: does the learned world rank controllers as the real env does?

A researcher should know whether M can be trained in before spending hours in it. The check
(`stage=dream dream.mode=fidelity`) scores one set of controllers both inside the dream (evolve's dream
settings) and in the real env, and reports the Spearman rank correlation of the two returns. The set:
constant-action probes (a controller with zero weights whose biases give the action: idle, gas, gas +
brake, ...), random candidates as CMA-ES's first generation draws them, and any evolve run's controller.
Teacher-forced over whole held-out episodes, it also reports M's reward error per block of steps,
where a dream's return comes from, and whether M listens to the actions at all: its loss on the same
episodes with actions from another moment fed in. A world whose data came from one driver can predict
the next frame from the frames alone (the driver's action follows from what it sees); then every
controller drives as the driver did in its dream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from worldmodel.models.controller import Controller
from worldmodel.models.mdnrnn import MDNRNN, mdn_loss

# Box probes (CarRacing: steer, gas, brake); a discrete env gets one probe per action instead.
BOX_PROBES = {
    "idle": [0.0, 0.0, 0.0],
    "gas": [0.0, 1.0, 0.0],
    "gas+brake": [0.0, 1.0, 1.0],
    "brake": [0.0, 0.0, 1.0],
    "left+gas": [-1.0, 1.0, 0.0],
    "right+gas": [1.0, 1.0, 0.0],
}
_EDGE = 0.9999  # tanh never reaches ±1: the probe's biases aim this close


def constant_params(controller: Controller, action: np.ndarray | list[float] | int) -> np.ndarray:
    """Parameters that make `controller` act `action` whatever it reads: zero weights, biases chosen
    (box: an action value per dimension; discrete: an action index)."""
    if not controller.bias:
        raise ValueError("a controller without biases has no constant action: its output is 0 on 0 inputs")
    params = np.zeros(controller.n_params, np.float32)
    out = controller.shapes[-1][0]
    if controller.axis is not None:  # the centre of the action's bin on the tanh axis
        n = controller.action_dim
        bias = np.arctanh(np.array([(2 * controller.axis.index(int(action)) + 1) / n - 1]))
    elif controller.discrete:
        bias = np.full(out, -5.0)  # the first action's logit is 0
        if int(action) > 0:
            bias[int(action) - 1] = 5.0
    else:
        low, high, a = (np.asarray(v, np.float64) for v in (controller.low, controller.high, action))
        affine = np.where(low == -high, a / high, 2 * (a - low) / (high - low) - 1)
        clipped = np.zeros_like(a, dtype=bool)
        clipped[controller.clip] = True
        squashed = np.where(clipped, a, affine)  # clip(tanh(b), low, high) = a for b = atanh(a)
        bias = np.arctanh(np.clip(squashed, -_EDGE, _EDGE))
    params[-out:] = bias
    return params


def probes(controller: Controller) -> dict[str, np.ndarray]:
    """The constant-action probes for this controller's action space (none without biases: a
    controller with no bias cannot act alike whatever it reads)."""
    if not controller.bias:
        return {}
    if controller.discrete:
        return {f"action {k}": constant_params(controller, k) for k in range(controller.action_dim)}
    if controller.action_dim != 3:
        return {"zero": np.zeros(controller.n_params, np.float32)}
    return {name: constant_params(controller, a) for name, a in BOX_PROBES.items()}


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    ra, rb = ranks(np.asarray(a, np.float64)), ranks(np.asarray(b, np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class RewardBlocks:
    """M's reward head against the real rewards, teacher-forced, per block of steps."""

    block: int
    mse: np.ndarray  # (blocks,) mean squared error per step
    predicted: np.ndarray  # (blocks,) mean predicted return of a block, per episode
    real: np.ndarray  # (blocks,) mean real return of a block, per episode
    done_predicted: np.ndarray  # (blocks,) Σ P(done) per episode
    done_real: np.ndarray  # (blocks,) dones per episode


@torch.no_grad()
def reward_blocks(
    rnn: MDNRNN,
    z: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    block: int,
    terminal_reward: float = 0.0,
) -> RewardBlocks:
    """z, actions, rewards, dones: whole episodes (E, T, ...) of equal length, M reading the real z.
    A predicted step earns its reward plus P(done) × `terminal_reward`, as a dream pays it, against
    the real reward."""
    out, _, _ = rnn(z, actions)
    p_done = rnn.done_probability(out.done_logit)
    n = z.shape[1] // block
    cut = n * block

    def per_block(x: torch.Tensor) -> torch.Tensor:
        return x[:, :cut].reshape(x.shape[0], n, block)

    predicted = out.reward + p_done * terminal_reward
    err = per_block((predicted - rewards) ** 2).mean(dim=(0, 2))
    return RewardBlocks(
        block,
        err.numpy(),
        per_block(predicted).sum(2).mean(0).numpy(),
        per_block(rewards).sum(2).mean(0).numpy(),
        per_block(p_done).sum(2).mean(0).numpy(),
        per_block(dones.float()).sum(2).mean(0).numpy(),
    )


@dataclass
class ActionSensitivity:
    """M's teacher-forced loss with each episode's own actions and with those of another moment."""

    nll: float  # mixture NLL of z_{t+1} per latent dimension, own actions
    nll_foreign: float  # the same with the actions of another moment
    reward_mse: float
    reward_mse_foreign: float


@torch.no_grad()
def action_sensitivity(
    rnn: MDNRNN, z: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor
) -> ActionSensitivity:
    """z, actions, rewards: whole episodes (E, T, ...) of equal length. For the foreign loss each
    episode is fed its own actions from half an episode later (rolled in time): actions of the same
    kind that do not belong to these frames. If the two losses match, M ignores what the controller does."""

    def loss(a: torch.Tensor):
        out, _, _ = rnn(z[:, :-1], a[:, :-1])
        return mdn_loss(out, z[:, 1:], rewards[:, :-1], torch.zeros_like(rewards[:, :-1]))

    own, foreign = loss(actions), loss(actions.roll(actions.shape[1] // 2, dims=1))
    return ActionSensitivity(float(own.nll), float(foreign.nll), float(own.reward), float(foreign.reward))


def scatter(names: list[str], dream: np.ndarray, real: np.ndarray, rho: float, path) -> None:
    """Dream return against real return, one labelled point per controller."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5), dpi=100)
    ax.scatter(dream, real, color="#3a7ca5")
    for name, x, y in zip(names, dream, real, strict=True):
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("dream return (mean)")
    ax.set_ylabel("real return (mean)")
    ax.set_title(f"dream vs real: Spearman ρ = {rho:.2f} over {len(names)} controllers")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
