"""Controllers in the real env: a pool of workers, each driving `envs_per_worker` envs in lockstep with
one agent, and the standard evaluation that `stage=evaluate` and evolve's final evaluation share.

Rollouts are grouped into lockstep batches by their position in the request alone, and every batch is
padded to the same size (see `agent.py`), so a score depends on the parameters and the seed, never
on the worker count.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf

from worldmodel import tracking
from worldmodel.agent import Agent, Rollout, load_rnn, load_vae, play, worker_inference
from worldmodel.envs import make_env
from worldmodel.images import save_gif
from worldmodel.models.controller import Controller
from worldmodel.parallel import Pool, make_pool
from worldmodel.progress import progress_bar
from worldmodel.seeds import EVAL, seed_of

log = logging.getLogger(__name__)


# ---- the workers (module-level functions: the pool spawns) ------------------------------------------


def init_worker(
    weights: dict[str, bytes], env_cfg: dict, controller_hparams: dict, slots: int, z: str = "mean"
) -> tuple:
    """`weights`: the V and M checkpoints' bytes, not their paths, since a Ray worker may be elsewhere."""
    worker_inference()
    vae, rnn = (load(io.BytesIO(weights[k])) for load, k in ((load_vae, "vae"), (load_rnn, "rnn")))
    agent = Agent(vae, rnn, Controller(**controller_hparams), slots, z)
    return [make_env(OmegaConf.create(env_cfg)) for _ in range(slots)], agent


def rollout_batch(state: tuple, payload: tuple) -> list[Rollout]:
    envs, agent = state
    params, seeds, max_steps, stall_steps, record = payload
    agent.set_params(params)
    return play(envs, agent, seeds, max_steps, stall_steps, record)


class RealScorer:
    """Real-env rollouts of controller parameter vectors; the pool starts on first use (a dream-mode
    evolve run may never need it)."""

    def __init__(
        self,
        backend: DictConfig,
        workers: int | None,
        envs_per_worker: int,
        paths: dict[str, str],
        env_cfg: DictConfig,
        controller_hparams: dict,
        timeout: float,
        z: str = "mean",
    ) -> None:
        """`backend`: conf/backend; `workers`: processes, None for one per core (or per Ray CPU);
        `envs_per_worker`: envs each steps in lockstep; `z`: how the agent reads the VAE (agent.z)."""
        self.slots = int(envs_per_worker)
        load_vae(paths["vae"]), load_rnn(paths["rnn"])  # a bad checkpoint fails here, named, not in a worker
        weights = {k: Path(paths[k]).read_bytes() for k in ("vae", "rnn")}
        env = OmegaConf.to_container(env_cfg, resolve=True)
        self.args = (
            backend,
            workers,
            init_worker,
            (weights, env, controller_hparams, self.slots, z),
            rollout_batch,
            timeout,
        )
        self.pool: Pool | None = None

    @property
    def replaced(self) -> int:
        """Workers that died or hung and were replaced."""
        return self.pool.replaced if self.pool is not None else 0

    def run(
        self,
        params: np.ndarray,
        seeds: list[int],
        max_steps: int,
        stall_steps: int = 0,
        record: int = 0,
        progress: str | None = None,
    ) -> list[Rollout]:
        """Rollout i: parameters params[i] (N, P) on track seeds[i]; a progress bar named `progress`."""
        if self.pool is None:
            self.pool = make_pool(*self.args)
        k = self.slots
        payloads = [
            (params[i : i + k], seeds[i : i + k], max_steps, stall_steps, record)
            for i in range(0, len(seeds), k)
        ]
        batches: list[list[Rollout]] = [[] for _ in payloads]
        with progress_bar(total=len(seeds), desc=progress, unit="ep", disable=progress is None) as bar:
            for i, batch in self.pool.imap_unordered(payloads):
                batches[i] = batch
                bar.update(len(batch))
        return [rollout for batch in batches for rollout in batch]

    def replay(self, params: np.ndarray, seeds: list[int], i: int, max_steps: int, record: int) -> Rollout:
        """Rollout i of an earlier `run(params, seeds, max_steps)`, again, with its first `record` frames:
        its whole lockstep batch is played again, so the episode is the same one."""
        start = i // self.slots * self.slots
        end = start + self.slots
        return self.run(params[start:end], seeds[start:end], max_steps, record=record)[i - start]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> RealScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def real_scorer(cfg: DictConfig, section: str, paths: dict[str, str], controller_hparams: dict) -> RealScorer:
    """A scorer for the stage whose `section` sets the workers and envs per worker (evolve, evaluate),
    with the agent reading z as `agent.z` says."""
    hp = cfg[section]
    return RealScorer(
        cfg.backend,
        hp.workers,
        hp.envs_per_worker,
        paths,
        cfg.env,
        controller_hparams,
        float(cfg.evolve.rollout_timeout),
        str(cfg.agent.z),
    )


# ---- the standard evaluation -----------------------------------------------------------------------


def eval_seeds(cfg: DictConfig, episodes: int) -> list[int]:
    """The unseen tracks: seed stream EVAL, which no training rollout draws from."""
    return [seed_of(int(cfg.seed), EVAL, i) for i in range(episodes)]


def eval_steps(cfg: DictConfig) -> int:
    """Evaluation episodes run to the env's full length unless `evaluate.max_steps` says otherwise."""
    return int(cfg.evaluate.max_steps or cfg.env.episode_steps)


@dataclass
class Evaluation:
    seeds: list[int]
    scores: np.ndarray
    steps: np.ndarray

    @property
    def metrics(self) -> dict[str, float]:
        s = self.scores
        return {
            "eval/score_mean": float(s.mean()),
            "eval/score_std": float(s.std()),
            "eval/score_min": float(s.min()),
            "eval/score_median": float(np.median(s)),
            "eval/score_max": float(s.max()),
            "eval/episodes": float(len(s)),
        }


def evaluate(
    scorer: RealScorer, params: np.ndarray, seeds: list[int], max_steps: int, gif_steps: int, fps: int
) -> Evaluation:
    """Score one controller on every track in `seeds` (full episodes, never cut short) and log to the
    active run: the summary metrics, `scores.csv` (seed, score, steps), `score_histogram.png`, and GIFs
    of the best and the worst track (real | reconstruction)."""
    every = np.repeat(params[None], len(seeds), axis=0)
    rollouts = scorer.run(every, seeds, max_steps, progress="evaluate")
    result = Evaluation(
        list(seeds), np.array([r.score for r in rollouts]), np.array([r.steps for r in rollouts])
    )
    mlflow.log_metrics(result.metrics)
    with tracking.artifact("scores.csv") as path, open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "score", "steps"])
        writer.writerows(zip(result.seeds, result.scores.round(3), result.steps, strict=True))
    with tracking.artifact("score_histogram.png") as path:
        _histogram(result.scores, path)
    if gif_steps:
        for name, i in (("best", int(result.scores.argmax())), ("worst", int(result.scores.argmin()))):
            rollout = scorer.replay(every, list(seeds), i, max_steps, gif_steps)
            if not np.isclose(rollout.score, result.scores[i]):
                log.warning("the %s track replayed to %.1f, not %.1f", name, rollout.score, result.scores[i])
            with tracking.artifact(f"gifs/{name}_track.gif") as path:
                save_gif(rollout.frames, path, fps)
    m = result.metrics
    log.info(
        "evaluation over %d unseen tracks: %.1f ± %.1f (min %.1f, median %.1f, max %.1f)",
        len(seeds),
        m["eval/score_mean"],
        m["eval/score_std"],
        m["eval/score_min"],
        m["eval/score_median"],
        m["eval/score_max"],
    )
    return result


def _histogram(scores: np.ndarray, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(scores, bins=min(30, max(5, len(scores) // 3)), color="#3a7ca5", edgecolor="white")
    ax.axvline(scores.mean(), color="#d1495b", label=f"mean {scores.mean():.0f} ± {scores.std():.0f}")
    ax.set_xlabel("score")
    ax.set_ylabel("tracks")
    ax.set_title(f"{len(scores)} unseen tracks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
