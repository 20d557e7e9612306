"""evolve: CMA-ES on the controller, in the real env or inside the learned world.

- `evolve.mode=real`: every rollout of every candidate runs in the env, spread over worker processes
  that each hold an env, the VAE and the MDN-RNN (CPU, one torch thread). A worker that dies or hangs
  is replaced and its rollouts re-run.
- `evolve.mode=dream`: all popsize × rollouts rollouts advance together as one batch inside the
  MDN-RNN, from real initial latents; every `evolve.real_check_every` generations the generation's best
  is re-checked in the real env and that score is logged beside the dream score.

All candidates of a generation are scored on the same rollout seeds (common random numbers). The CMA
state is saved every generation (`cma/state.pkl`, the `cma` package's own pickling), so an interrupted
run resumes with `inputs.resume=<run id>`. At the end the best controller is evaluated on
`evolve.eval_episodes` real episodes with seeds never used in training.
"""

from __future__ import annotations

import logging
import os
import pickle
import time

import cma
import mlflow
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from worldmodel import tracking, training
from worldmodel.agent import Agent, load_controller, load_rnn, load_vae, play, single_frame_inference
from worldmodel.checkpoints import save_checkpoint
from worldmodel.config import check, one_of, positive_int, positive_number
from worldmodel.data import latents
from worldmodel.dreaming import dream_rollouts, initial_latents
from worldmodel.envs import make_env
from worldmodel.errors import WorldModelError
from worldmodel.images import save_gif
from worldmodel.models.controller import Controller
from worldmodel.parallel import WorkerPool

log = logging.getLogger(__name__)
TRAIN, EVAL, CHECK = 1, 2, 3  # seed streams: training rollouts, final evaluation, real checks


def validate(cfg: DictConfig) -> None:
    one_of(cfg, "evolve.mode", ["real", "dream"])
    one_of(cfg, "evolve.inputs", ["zh", "z"])
    positive_int(
        cfg,
        "evolve.rollouts",
        "evolve.generations",
        "evolve.max_steps",
        "evolve.real_check_rollouts",
        "evolve.gif_steps",
    )
    check(cfg, "evolve.popsize", lambda v: isinstance(v, int) and v >= 2, "an integer ≥ 2")
    positive_number(cfg, "evolve.sigma0", "evolve.rollout_timeout")
    for key in ("evolve.hidden", "evolve.real_check_every", "evolve.eval_episodes"):
        check(cfg, key, lambda v: isinstance(v, int) and v >= 0, "an integer ≥ 0")
    check(cfg, "evolve.temperature", lambda v: v >= 0, "a number ≥ 0")
    check(
        cfg,
        "evolve.workers",
        lambda v: v is None or (isinstance(v, int) and v > 0),
        "null (all cores) or a positive integer",
    )


def seed_of(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


# ---- real-env workers -------------------------------------------------------------------------------


def init_worker(paths: dict[str, str], env_cfg: dict, controller_hparams: dict) -> tuple:
    single_frame_inference()
    agent = Agent(load_vae(paths["vae"]), load_rnn(paths["rnn"]), Controller(**controller_hparams))
    return make_env(OmegaConf.create(env_cfg)), agent, env_cfg


def real_rollout(state: tuple, payload: tuple) -> tuple[float, list[np.ndarray]]:
    env, agent, env_cfg = state
    params, seed, max_steps, record = payload
    agent.set_params(params)
    return play(env, agent, seed, max_steps, int(env_cfg["crop_bottom"]), int(env_cfg["image_size"]), record)


# ---- the stage --------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> str:
    hp = cfg.evolve
    world = training.resolve_world(cfg)
    paths = {
        "vae": str(training.checkpoint_path(world.vae_run.info.run_id)),
        "rnn": str(training.checkpoint_path(world.rnn_run.info.run_id)),
    }
    rnn = load_rnn(paths["rnn"])
    controller = Controller(rnn.latent, rnn.hidden, rnn.action_dim, str(hp.inputs), int(hp.hidden))
    first = latents.load(tracking.artifact_path(world.encode_id, "latents.h5"), "train")
    mu0, logvar0 = first["mu"][:, 0], first["logvar"][:, 0]
    workers = int(hp.workers or os.cpu_count() or 1)
    tags = {
        "latent_size": str(cfg.latent.size),
        "mode": str(hp.mode),
        "controller_params": str(controller.n_params),
    }

    with tracking.stage_run(
        cfg,
        "evolve",
        ["evolve", "latent"],
        world.upstream,
        tags,
        resume=cfg.inputs.resume,
        may_change=["evolve.generations", "evolve.workers", "evolve.eval_episodes"],
    ) as run:
        out_dir, in_place = tracking.local_artifact_dir("")
        es, best = _cma_state(cfg, controller.n_params)
        pool = _LazyPool(
            workers,
            paths,
            OmegaConf.to_container(cfg.env, resolve=True),
            controller.hparams,
            float(hp.rollout_timeout),
        )
        try:
            for gen in tqdm(range(es.countiter, int(hp.generations)), desc="evolve", unit="gen"):
                solutions = np.asarray(es.ask(), dtype=np.float32)
                seeds = [seed_of(int(cfg.seed), TRAIN, gen, r) for r in range(int(hp.rollouts))]
                t0 = time.perf_counter()
                if hp.mode == "dream":
                    fitness = _dream_fitness(rnn, controller, solutions, seeds, mu0, logvar0, hp)
                else:
                    fitness = _real_fitness(pool, solutions, seeds, int(hp.max_steps))
                elapsed = time.perf_counter() - t0
                es.tell(list(solutions.astype(np.float64)), list(-fitness))  # cma minimises
                top = int(np.argmax(fitness))
                if fitness[top] > best["fitness"]:
                    best = {
                        "fitness": float(fitness[top]),
                        "params": solutions[top].copy(),
                        "generation": gen,
                    }
                metrics = {
                    "fitness/best": fitness.max(),
                    "fitness/mean": fitness.mean(),
                    "fitness/worst": fitness.min(),
                    "cma/sigma": es.sigma,
                    "rollouts_per_s": fitness.size * int(hp.rollouts) / elapsed,
                }
                if hp.mode == "dream" and hp.real_check_every and (gen + 1) % int(hp.real_check_every) == 0:
                    check_seeds = [
                        seed_of(int(cfg.seed), CHECK, gen, r) for r in range(int(hp.real_check_rollouts))
                    ]
                    real = _real_fitness(pool, solutions[top : top + 1], check_seeds, int(hp.max_steps))
                    metrics["real/check_score"] = real[0]
                    metrics["real/check_dream_score"] = fitness[top]
                training.log_epoch(metrics, gen)
                _save_state(out_dir, in_place, es, best)
                log.info(
                    "evolve gen %d: best %.1f mean %.1f sigma %.3f%s",
                    gen,
                    fitness.max(),
                    fitness.mean(),
                    es.sigma,
                    f" (real {metrics['real/check_score']:.1f})" if "real/check_score" in metrics else "",
                )

            controller.set_flat(torch.from_numpy(best["params"]))
            save_checkpoint(
                out_dir / "controller.pt", controller, fitness=best["fitness"], generation=best["generation"]
            )
            tracking.publish(out_dir / "controller.pt", "", in_place)
            mlflow.log_metric("best_fitness", best["fitness"])
            if int(hp.eval_episodes):
                _final_evaluation(cfg, pool, best["params"], out_dir, in_place)
        finally:
            mlflow.log_metric("workers_replaced", pool.replaced)
            pool.close()
        return run.info.run_id


def _cma_state(cfg: DictConfig, n_params: int) -> tuple[cma.CMAEvolutionStrategy, dict]:
    hp = cfg.evolve
    if cfg.inputs.resume and "cma/state.pkl" in tracking.list_artifacts(cfg.inputs.resume, "cma"):
        with open(tracking.artifact_path(cfg.inputs.resume, "cma/state.pkl"), "rb") as f:
            state = pickle.load(f)  # our own run's artifact, written by _save_state
        log.info("evolve: resuming after generation %d", state["es"].countiter - 1)
        return state["es"], state["best"]
    options = {"popsize": int(hp.popsize), "seed": int(cfg.seed) + 1, "verbose": -9}
    es = cma.CMAEvolutionStrategy(np.zeros(n_params), float(hp.sigma0), options)
    return es, {"fitness": -np.inf, "params": np.zeros(n_params, np.float32), "generation": -1}


def _save_state(out_dir, in_place: bool, es: cma.CMAEvolutionStrategy, best: dict) -> None:
    path = out_dir / "cma" / "state.pkl"
    path.parent.mkdir(exist_ok=True)
    partial = path.with_name("state.pkl.partial")
    partial.write_bytes(pickle.dumps({"es": es, "best": best}))
    os.replace(partial, path)
    tracking.publish(path, "cma", in_place)


def _dream_fitness(
    rnn, controller: Controller, solutions: np.ndarray, seeds: list[int], mu0, logvar0, hp: DictConfig
) -> np.ndarray:
    """popsize × rollouts dreams in one batch; row c·R + r is candidate c on rollout seed r."""
    p, r = len(solutions), len(seeds)
    params = torch.from_numpy(solutions).repeat_interleave(r, dim=0)
    row_seeds = seeds * p
    z0 = initial_latents(mu0, logvar0, row_seeds)
    returns, _ = dream_rollouts(
        rnn, controller, params, z0, row_seeds, int(hp.max_steps), float(hp.temperature)
    )
    return returns.view(p, r).mean(1).numpy()


def _real_fitness(pool: _LazyPool, solutions: np.ndarray, seeds: list[int], max_steps: int) -> np.ndarray:
    payloads = [(s, seed, max_steps, False) for s in solutions for seed in seeds]
    returns = [ret for ret, _ in pool.get().map(payloads)]
    return np.asarray(returns, dtype=np.float64).reshape(len(solutions), len(seeds)).mean(1)


def _final_evaluation(cfg: DictConfig, pool: _LazyPool, params: np.ndarray, out_dir, in_place: bool) -> None:
    hp = cfg.evolve
    seeds = [seed_of(int(cfg.seed), EVAL, i) for i in range(int(hp.eval_episodes))]
    # Episode 0 is recorded (up to gif_steps frames) for the GIF; its score counts like the others.
    payloads = [(params, s, int(hp.max_steps), i == 0) for i, s in enumerate(seeds)]
    results = pool.get().map(payloads)
    scores = np.array([ret for ret, _ in results])
    mlflow.log_metrics(
        {
            "eval/score_mean": scores.mean(),
            "eval/score_std": scores.std(),
            "eval/episodes": float(len(scores)),
        }
    )
    frames = results[0][1][: int(hp.gif_steps)]
    if frames:
        save_gif(frames, out_dir / "evaluation.gif", int(cfg.dream.fps))
        tracking.publish(out_dir / "evaluation.gif", "", in_place)
    log.info(
        "evolve: real evaluation over %d unseen tracks: %.1f ± %.1f", len(scores), scores.mean(), scores.std()
    )


class _LazyPool:
    """The real-env worker pool, started on first use (a dream run may never need it)."""

    def __init__(
        self, workers: int, paths: dict, env_cfg: dict, controller_hparams: dict, timeout: float
    ) -> None:
        self.args = (workers, init_worker, (paths, env_cfg, controller_hparams), real_rollout, timeout)
        self.pool: WorkerPool | None = None

    @property
    def replaced(self) -> int:
        """Workers that died or hung and were replaced."""
        return self.pool.replaced if self.pool is not None else 0

    def get(self) -> WorkerPool:
        if self.pool is None:
            self.pool = WorkerPool(*self.args)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def load_evolved_controller(run_id: str) -> Controller:
    """The best controller of an evolve run."""
    path = tracking.artifact_path(run_id, "controller.pt")
    if not path.exists():
        raise WorldModelError(f"evolve run {run_id} has no controller.pt; re-run evolve")
    return load_controller(path)
