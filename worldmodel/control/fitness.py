"""What CMA-ES maximises: a controller's fitness, in the dream or in the real env, behind one small
interface, so that evolve has one search loop for both."""

from __future__ import annotations

from typing import Protocol

import numpy as np
from omegaconf import DictConfig

from worldmodel.config import settings
from worldmodel.config.sections import Evolve
from worldmodel.control.dream import DreamSettings, dream_fitness
from worldmodel.control.scorer import RealScorer
from worldmodel.models.controller import Controller
from worldmodel.models.mdnrnn import MDNRNN
from worldmodel.seeds import CHECK, seed_of


class Fitness(Protocol):
    def __call__(self, solutions: np.ndarray, seeds: list[int]) -> tuple[np.ndarray, dict[str, float]]:
        """One fitness per row of `solutions` (P, n_params), the mean over `seeds`; and metrics."""

    def check(self, gen: int, kept: np.ndarray, top: np.ndarray, seeds: list[int]) -> dict[str, float]:
        """Metrics that compare the kept and top controllers with the real env, where that is due."""


class RealFitness:
    """Returns in the real env: every candidate on every seed; rollouts stop early once stalled."""

    def __init__(self, scorer: RealScorer, hp: Evolve) -> None:
        self.scorer, self.max_steps, self.stall_steps = scorer, hp.max_steps, hp.stall_steps

    def __call__(self, solutions: np.ndarray, seeds: list[int]) -> tuple[np.ndarray, dict[str, float]]:
        params = np.repeat(solutions, len(seeds), axis=0)
        rollouts = self.scorer.run(params, seeds * len(solutions), self.max_steps, self.stall_steps)
        returns = np.array([ro.score for ro in rollouts]).reshape(len(solutions), len(seeds))
        steps = np.array([ro.steps for ro in rollouts])
        metrics = {
            "rollouts/stalled_fraction": float(np.mean([ro.stalled for ro in rollouts])),
            "rollouts/steps_mean": float(steps.mean()),
            "rollouts/env_steps": float(steps.sum()),
        }
        return returns.mean(1), metrics

    def check(self, gen: int, kept: np.ndarray, top: np.ndarray, seeds: list[int]) -> dict[str, float]:
        return {}  # the fitness is the real env's already


class DreamFitness:
    """Returns in M's dream, all candidates × seeds in one batch; every `real_check_every` generations
    the kept controller and the generation's top one also drive on real check tracks."""

    def __init__(
        self,
        rnn: MDNRNN,
        controller: Controller,
        starts: tuple[np.ndarray | None, np.ndarray | None],
        cfg: DictConfig,
        scorer: RealScorer,
    ) -> None:
        self.rnn, self.controller, self.starts, self.scorer = rnn, controller, starts, scorer
        self.settings, hp = DreamSettings.of(cfg), settings(cfg, Evolve)
        self.seed, self.every = int(cfg.seed), hp.real_check_every
        self.check_rollouts, self.max_steps = hp.real_check_rollouts, hp.max_steps
        self.top_fitness = np.nan

    def dream(self, solutions: np.ndarray, seeds: list[int]) -> np.ndarray:
        return dream_fitness(self.rnn, self.controller, solutions, seeds, self.starts, self.settings)

    def __call__(self, solutions: np.ndarray, seeds: list[int]) -> tuple[np.ndarray, dict[str, float]]:
        fitness = self.dream(solutions, seeds)
        self.top_fitness = fitness.max()
        return fitness, {}

    def check(self, gen: int, kept: np.ndarray, top: np.ndarray, seeds: list[int]) -> dict[str, float]:
        if not self.every or (gen + 1) % self.every:
            return {}
        n = self.check_rollouts
        check_seeds = [seed_of(self.seed, CHECK, gen, r) for r in range(n)]
        real = self.scorer.run(np.stack([kept] * n + [top] * n), check_seeds + check_seeds, self.max_steps)
        scores = np.array([r.score for r in real])
        return {
            "real/check_score": float(scores[:n].mean()),
            "real/check_top_score": float(scores[n:].mean()),
            "real/check_dream_score": self.dream(kept[None], seeds)[0],
            "real/check_top_dream_score": self.top_fitness,
        }
