"""Action policies for data collection, one class per option of the `policy` config group.

Each option names its class with `_target_` and is built with Hydra's `instantiate`, given the env's
`ActionSpace` and a generator: adding a policy is a class here and one YAML file. A policy draws only
from the generator it is given, so an episode's actions depend on its seed alone. `fits` says which
action spaces it can act in; `check` validates its settings before any episode is played.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from worldmodel.config import check, is_int, non_negative_numbers, positive_int, positive_number
from worldmodel.envs.pixels import ActionSpace, action_space
from worldmodel.errors import WorldModelError


class Policy:
    """act(frame, t) → the stored action for step t; `start_state` → where an episode starts (None:
    the env's own reset). `acts_through`: the upstream stage whose V and M (and C) the policy acts
    through, resolved by the collect stage into `policy.paths` (None: it acts on its own)."""

    acts_through: str | None = None

    def __init__(self, space: ActionSpace, rng: np.random.Generator, name: str = "") -> None:
        self.space, self.rng, self.name = space, rng, name

    @staticmethod
    def fits(space: ActionSpace) -> bool:
        return True

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Range checks of `policy.*`; one line naming the key."""

    def act(self, frame: np.ndarray, t: int) -> np.ndarray:
        raise NotImplementedError

    def start_state(self) -> np.ndarray | None:
        return None

    def new_track(self) -> None:
        """The episode goes on in a fresh env (collect.reset_on_done): forget what was seen."""

    def one_hot(self, k: int) -> np.ndarray:
        out = np.zeros(self.space.dim, np.float32)
        out[k] = 1.0
        return out

    def uniform_one_hot(self) -> np.ndarray:
        """A uniformly drawn discrete action, one-hot."""
        return self.one_hot(int(self.rng.integers(self.space.dim)))


class PseudoRandomPolicy(Policy):
    """Seed 000 (CarRacing): a warm-up action, then every `refresh` steps a new one of accelerate /
    left / right / brake with probabilities `probs` and a magnitude r ~ U(0, 1), held until the next."""

    def __init__(
        self,
        space: ActionSpace,
        rng: np.random.Generator,
        warmup: int,
        warmup_action: Sequence[float],
        refresh: int,
        probs: Sequence[float],
        name: str = "pseudo_random",
    ) -> None:
        super().__init__(space, rng, name)
        self.warmup, self.refresh = int(warmup), int(refresh)
        self.warmup_action = np.asarray(warmup_action, dtype=np.float32)
        self.probs = np.asarray(probs, dtype=np.float64)
        self.action = self.warmup_action

    @staticmethod
    def fits(space: ActionSpace) -> bool:
        return space.kind == "box" and space.dim == 3  # steer, gas, brake

    @staticmethod
    def check(cfg: DictConfig) -> None:
        positive_int(cfg, "policy.refresh")
        check(cfg, "policy.warmup", lambda v: is_int(v) and v >= 0, "an integer ≥ 0")
        check(cfg, "policy.warmup_action", lambda v: len(v) == 3, "three numbers (steer, gas, brake)")
        check(
            cfg,
            "policy.probs",
            lambda v: len(v) == 4 and abs(sum(v) - 1) < 1e-6 and min(v) >= 0,
            "four non-negative probabilities summing to 1",
        )

    def act(self, frame: np.ndarray, t: int) -> np.ndarray:
        if t < self.warmup:
            self.action = self.warmup_action
        elif (t - self.warmup) % self.refresh == 0:
            kind = self.rng.choice(4, p=self.probs)
            r = self.rng.random()
            self.action = np.array(
                [[0.0, r, 0.0], [-r, 0.0, 0.0], [r, 0.0, 0.0], [0.0, 0.0, r]][kind], dtype=np.float32
            )
        return self.action


class RandomPolicy(Policy):
    """Seeds 003/004: a uniform sample of the action box (or a uniform discrete action), held for
    `refresh` steps."""

    def __init__(
        self, space: ActionSpace, rng: np.random.Generator, refresh: int, name: str = "random"
    ) -> None:
        super().__init__(space, rng, name)
        self.refresh = int(refresh)
        self.action: np.ndarray | None = None

    @staticmethod
    def check(cfg: DictConfig) -> None:
        positive_int(cfg, "policy.refresh")

    def act(self, frame: np.ndarray, t: int) -> np.ndarray:
        if t % self.refresh == 0 or self.action is None:
            if self.space.kind == "discrete":
                self.action = self.uniform_one_hot()
            else:
                self.action = self.rng.uniform(self.space.low, self.space.high).astype(np.float32)
        return self.action


class BrownianPolicy(Policy):
    """ctallec/world-models: a random walk in the action box, a ← clip(a + √dt · N(0, I))."""

    def __init__(
        self, space: ActionSpace, rng: np.random.Generator, dt: float, name: str = "brownian"
    ) -> None:
        super().__init__(space, rng, name)
        self.scale = math.sqrt(float(dt))
        self.action: np.ndarray | None = None

    @staticmethod
    def fits(space: ActionSpace) -> bool:
        return space.kind == "box"

    @staticmethod
    def check(cfg: DictConfig) -> None:
        positive_number(cfg, "policy.dt")

    def act(self, frame: np.ndarray, t: int) -> np.ndarray:
        low, high = self.space.low, self.space.high
        if self.action is None:
            self.action = self.rng.uniform(low, high).astype(np.float32)
        else:
            step = self.scale * self.rng.standard_normal(low.shape)
            self.action = np.clip(self.action + step, low, high).astype(np.float32)
        return self.action


class HoldRandomPolicy(Policy):
    """For a discrete env whose random play ends fast (CartPole falls in ~20 steps): a uniform action
    held for a uniform number of steps in [min_hold, max_hold], and episodes started from a state drawn
    uniformly in [start_low, start_high] (the env's `state`), so the data covers the whole track and
    large angles, not just the first steps of a fall from the centre."""

    def __init__(
        self,
        space: ActionSpace,
        rng: np.random.Generator,
        min_hold: int,
        max_hold: int,
        start_low: Sequence[float] | None = None,
        start_high: Sequence[float] | None = None,
        name: str = "hold_random",
    ) -> None:
        super().__init__(space, rng, name)
        self.min_hold, self.max_hold = int(min_hold), int(max_hold)
        self.start = None if start_low is None else (np.asarray(start_low), np.asarray(start_high))
        self.action, self.until = self.one_hot(0), 0

    @staticmethod
    def fits(space: ActionSpace) -> bool:
        return space.kind == "discrete"

    @staticmethod
    def check(cfg: DictConfig) -> None:
        positive_int(cfg, "policy.min_hold", "policy.max_hold")
        check(cfg, "policy.max_hold", lambda v: v >= cfg.policy.min_hold, "≥ policy.min_hold")
        check(
            cfg,
            "policy.start_high",
            lambda v: (
                (v is None) == (cfg.policy.start_low is None)
                and (
                    v is None
                    or (
                        len(v) == len(cfg.policy.start_low) and min(np.subtract(v, cfg.policy.start_low)) >= 0
                    )
                )
            ),
            "null with start_low, or a list as long as start_low and ≥ it",
        )

    def start_state(self) -> np.ndarray | None:
        return None if self.start is None else self.rng.uniform(*self.start)

    def act(self, frame: np.ndarray, t: int) -> np.ndarray:
        if t == 0 or t >= self.until:
            self.action = self.uniform_one_hot()
            self.until = t + int(self.rng.integers(self.min_hold, self.max_hold + 1))
        return self.action


class ControllerPolicy(Policy):
    """A controller evolved by an evolve run, acting through its VAE and MDN-RNN (the paper's
    iterative procedure: collect again with a trained agent). `paths` holds the checkpoint files,
    filled in by the collect stage from `run_id`. `noise` > 0 (box actions): the controller's action plus
    an Ornstein-Uhlenbeck offset of that stationary std (one per action dimension, or one for all),
    correlated over ~`noise_steps` steps, clipped to the box: a driver who drifts off its line and
    recovers, so M sees what actions do where the driver alone would not act so."""

    acts_through = "evolve"
    _agents: dict = {}  # one loaded agent per process and checkpoint set

    def __init__(
        self,
        space: ActionSpace,
        rng: np.random.Generator,
        run_id: str | None = None,
        paths: dict | None = None,
        name: str = "controller",
        z: str = "mean",
        noise: float | Sequence[float] = 0.0,
        noise_steps: int = 10,
    ) -> None:
        super().__init__(space, rng, name)
        from worldmodel.control.agent import Agent, load_rnn, load_vae, worker_inference

        self.noise = np.broadcast_to(np.asarray(noise, np.float32), (space.dim,))
        self.keep = 1.0 - 1.0 / float(noise_steps)  # the offset's memory per step
        self.innovation = self.noise * math.sqrt(1.0 - self.keep**2)  # so the offset's std is `noise`
        self.offset = np.zeros(space.dim, np.float32)
        _drift_fits(space.kind, noise)

        if not paths:
            raise WorldModelError("policy=controller: no checkpoints resolved; run it through stage=collect")
        import multiprocessing

        from worldmodel.control.agent import single_core

        in_worker = multiprocessing.parent_process() is not None  # a collect worker: one core each
        # In the stage's own process, act with the worker's settings: the same numbers as a worker.
        self._settings = contextlib.nullcontext if in_worker else single_core
        key = (type(self).__name__, paths.get("controller"), paths["vae"], paths["rnn"], z, *self.shape_key())
        if key not in self._agents:
            if in_worker:
                worker_inference()
            rnn = load_rnn(paths["rnn"])
            controller = self.controller(rnn, paths)
            self._agents[key] = Agent(load_vae(paths["vae"]), rnn, controller, z=z)
        self.agent = self._agents[key]

    def shape_key(self) -> tuple:
        """What, beyond the files, tells this policy's controller apart (none: it is loaded whole)."""
        return ()

    def controller(self, rnn, paths: dict):
        from worldmodel.control.agent import load_controller

        return load_controller(paths["controller"], self.space)

    def new_track(self) -> None:
        self.agent.reset([int(self.rng.integers(2**31))])

    @staticmethod
    def check(cfg: DictConfig) -> None:
        non_negative_numbers(cfg, "policy.noise")
        noise = OmegaConf.to_container(cfg.policy, resolve=True).get("noise", 0.0)
        if np.any(np.asarray(noise) > 0):
            positive_int(cfg, "policy.noise_steps")
            _drift_fits(action_space(cfg.env).kind, noise)  # before any run

    def act(self, frame: np.ndarray, t: int) -> np.ndarray:
        if t == 0:
            self.new_track()
        with self._settings():
            action = self.agent.act(frame[None])[0]
        if not self.noise.any():
            return action
        if t == 0:
            self.offset = np.zeros(self.space.dim, np.float32)
        step = self.innovation * self.rng.standard_normal(self.space.dim)
        self.offset = (self.keep * self.offset + step).astype(np.float32)
        return np.clip(action + self.offset, self.space.low, self.space.high).astype(np.float32)


class LinearRandomPolicy(ControllerPolicy):
    """A random linear controller on [z, h] per episode, weights and biases ~ N(0, `sigma`²), acting
    through a train_rnn run's V and M: data whose actions are C's own kind, as CMA-ES's first
    generation tries them (sigma = evolve.sigma0) and as Dropout's Dream Land's random 10 % (which used
    tiny weights). `clip`, `axis` and `bias`: how C maps its outputs to actions, as evolve will train it
    (evolve.clip_actions, discrete_axis, bias)."""

    acts_through = "train_rnn"

    def __init__(
        self,
        space: ActionSpace,
        rng: np.random.Generator,
        run_id: str | None = None,
        paths: dict | None = None,
        name: str = "linear_random",
        z: str = "mean",
        sigma: float = 0.1,
        clip: Sequence[int] = (),
        axis: Sequence[int] | None = None,
        bias: bool = True,
    ) -> None:
        self.sigma, self.clip = float(sigma), list(clip)
        self.axis, self.bias = (None if axis is None else list(axis)), bool(bias)
        super().__init__(space, rng, run_id, paths, name, z)
        n = self.agent.controller.n_params
        self.params = self.rng.normal(0.0, self.sigma, n).astype(np.float32)

    @staticmethod
    def fits(space: ActionSpace) -> bool:
        return True

    @staticmethod
    def check(cfg: DictConfig) -> None:
        positive_number(cfg, "policy.sigma")

    def shape_key(self) -> tuple:
        return tuple(self.clip), None if self.axis is None else tuple(self.axis), self.bias

    def controller(self, rnn, paths: dict):
        from worldmodel.control.agent import new_controller

        return new_controller(rnn, self.space, clip=self.clip, axis=self.axis, bias=self.bias)

    def act(self, frame: np.ndarray, t: int) -> np.ndarray:
        if t == 0:
            self.agent.set_params(self.params)
        return super().act(frame, t)


def _drift_fits(kind: str, noise) -> None:
    """The controller's action noise is a drift in a continuous box: refused for other actions."""
    if np.any(np.asarray(noise) > 0) and kind != "box":
        raise WorldModelError(f"config key 'policy.noise' must be 0 for {kind} actions (got {noise})")


def validate(cfg: DictConfig) -> None:
    """The chosen policy exists, fits the env's actions, and has sane settings: before any episode."""
    try:
        cls = get_class(str(cfg.policy.get("_target_")))
    except Exception as err:
        raise WorldModelError(f"config key 'policy._target_' names no policy class ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise WorldModelError(f"config key 'policy._target_': {cls} is not a worldmodel policy")
    space = action_space(cfg.env)
    if not cls.fits(space):
        raise WorldModelError(
            f"policy={cfg.policy.name} cannot act in env={cfg.env.name} ({space.kind} actions of "
            f"dimension {space.dim}); pick another policy"
        )
    cls.check(cfg)


def make_policy(cfg: DictConfig, space: ActionSpace, rng: np.random.Generator) -> Policy:
    return instantiate(cfg, space=space, rng=rng, _convert_="all")
