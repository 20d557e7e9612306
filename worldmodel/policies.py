"""Action policies for data collection. Each draws only from the generator it is given, so an
episode's actions depend on its seed alone."""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
from omegaconf import DictConfig

from worldmodel.config import check, is_int, one_of, positive_int, positive_number
from worldmodel.errors import WorldModelError


class Policy(Protocol):
    def act(self, frame: np.ndarray, t: int) -> np.ndarray:
        """Action for step `t` of the episode, given the preprocessed frame."""


class PseudoRandomPolicy:
    """Seed 000: a warm-up action, then every `refresh` steps a new one of accelerate / left /
    right / brake with probabilities `probs` and a magnitude r ~ U(0, 1), held until the next."""

    def __init__(self, cfg: DictConfig, rng: np.random.Generator) -> None:
        self.rng = rng
        self.warmup = int(cfg.warmup)
        self.warmup_action = np.asarray(cfg.warmup_action, dtype=np.float32)
        self.refresh = int(cfg.refresh)
        self.probs = np.asarray(cfg.probs, dtype=np.float64)
        self.action = self.warmup_action

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


class RandomPolicy:
    """Seeds 003/004: a uniform sample of the action box, held for `refresh` steps."""

    def __init__(self, cfg: DictConfig, rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> None:
        self.rng, self.low, self.high = rng, low, high
        self.refresh = int(cfg.refresh)
        self.action = None

    def act(self, frame: np.ndarray, t: int) -> np.ndarray:
        if t % self.refresh == 0 or self.action is None:
            self.action = self.rng.uniform(self.low, self.high).astype(np.float32)
        return self.action


class BrownianPolicy:
    """ctallec/world-models: a random walk in the action box, a ← clip(a + √dt · N(0, I))."""

    def __init__(self, cfg: DictConfig, rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> None:
        self.rng, self.low, self.high = rng, low, high
        self.scale = math.sqrt(float(cfg.dt))
        self.action = None

    def act(self, frame: np.ndarray, t: int) -> np.ndarray:
        if self.action is None:
            self.action = self.rng.uniform(self.low, self.high).astype(np.float32)
        else:
            step = self.scale * self.rng.standard_normal(self.low.shape)
            self.action = np.clip(self.action + step, self.low, self.high).astype(np.float32)
        return self.action


class ControllerPolicy:
    """A controller evolved by an evolve run, acting through its VAE and MDN-RNN (the paper's
    iterative procedure: collect again with a trained agent). `cfg.paths` holds the checkpoint files,
    filled in by the collect stage from `policy.run_id`."""

    _agents: dict = {}  # one loaded agent per process and checkpoint set

    def __init__(self, cfg: DictConfig) -> None:
        from worldmodel.agent import Agent, load_controller, load_rnn, load_vae, worker_inference

        if "paths" not in cfg:
            raise WorldModelError("policy=controller: no checkpoints resolved; run it through stage=collect")
        key = (cfg.paths.controller, cfg.paths.vae, cfg.paths.rnn)
        if key not in self._agents:
            import multiprocessing

            if multiprocessing.parent_process() is not None:  # a collect worker: one core each
                worker_inference()
            self._agents[key] = Agent(
                load_vae(cfg.paths.vae), load_rnn(cfg.paths.rnn), load_controller(cfg.paths.controller)
            )
        self.agent = self._agents[key]

    def act(self, frame: np.ndarray, t: int) -> np.ndarray:
        if t == 0:
            self.agent.reset()
        return self.agent.act(frame[None])[0]


def validate(cfg: DictConfig) -> None:
    """The policy group's settings, checked before any episode is played."""
    one_of(cfg, "policy.name", ["pseudo_random", "random", "brownian", "controller"])
    if cfg.policy.name in ("pseudo_random", "random"):
        positive_int(cfg, "policy.refresh")
    if cfg.policy.name == "pseudo_random":
        check(cfg, "policy.warmup", lambda v: is_int(v) and v >= 0, "an integer ≥ 0")
        check(cfg, "policy.warmup_action", lambda v: len(v) == 3, "three numbers (steer, gas, brake)")
        check(
            cfg,
            "policy.probs",
            lambda v: len(v) == 4 and abs(sum(v) - 1) < 1e-6 and min(v) >= 0,
            "four non-negative probabilities summing to 1",
        )
    if cfg.policy.name == "brownian":
        positive_number(cfg, "policy.dt")


def make_policy(cfg: DictConfig, rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> Policy:
    name = cfg.name
    if name == "pseudo_random":
        return PseudoRandomPolicy(cfg, rng)
    if name == "random":
        return RandomPolicy(cfg, rng, low, high)
    if name == "brownian":
        return BrownianPolicy(cfg, rng, low, high)
    if name == "controller":
        return ControllerPolicy(cfg)
    raise WorldModelError(
        f"config key 'policy.name' must be one of pseudo_random, random, brownian, controller (got {name!r})"
    )
