"""Controllers in the real env: a pool of workers, each driving `envs_per_worker` envs in lockstep with
one agent, and the standard evaluation that `stage=evaluate` and evolve's final evaluation share.

Rollouts are grouped into lockstep batches by their position in the request alone, and every batch is
padded to the same size (see `agent.py`), so a score depends on the parameters and the seed, never
on the worker count.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from worldmodel.control.agent import Agent, Rollout, load_rnn, load_vae, play, worker_inference
from worldmodel.envs.pixels import make_env
from worldmodel.models.controller import Controller
from worldmodel.parallel.pool import Pool, make_pool
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

    def replay(
        self, params: np.ndarray, seeds: list[int], picked: list[int], record: int
    ) -> dict[int, Rollout]:
        """Rollouts `picked` of an earlier `run(params, seeds, …)`, again, for their first `record` steps
        and frames: each one's whole lockstep batch is played again (once, however many of `picked` it
        holds; the batches in parallel), so every episode starts as the same one."""
        k = self.slots
        starts = sorted({i // k * k for i in picked})
        rows = [j for s in starts for j in range(s, min(s + k, len(seeds)))]
        again = self.run(params[rows], [seeds[j] for j in rows], record, record=record)
        return {i: again[rows.index(i)] for i in picked}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> RealScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def real_scorer(cfg: DictConfig, section: str, paths: dict[str, str], controller_hparams: dict) -> RealScorer:
    """A scorer for the stage whose `section` sets the workers, envs per worker and timeout (evolve,
    evaluate), with the agent reading z as `agent.z` says."""
    hp = cfg[section]
    return RealScorer(
        cfg.backend,
        hp.workers,
        hp.envs_per_worker,
        paths,
        cfg.env,
        controller_hparams,
        float(hp.rollout_timeout),
        str(cfg.agent.z),
    )


# ---- the standard evaluation -----------------------------------------------------------------------


def eval_seeds(cfg: DictConfig, episodes: int) -> list[int]:
    """The unseen tracks: seed stream EVAL, which no training rollout draws from."""
    return [seed_of(int(cfg.seed), EVAL, i) for i in range(episodes)]


def eval_steps(cfg: DictConfig) -> int:
    """Evaluation episodes run to the env's full length unless `evaluate.max_steps` says otherwise."""
    return int(cfg.evaluate.max_steps or cfg.env.episode_steps)
