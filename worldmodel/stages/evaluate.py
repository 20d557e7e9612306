"""evaluate: the standard score of an evolve run's controller.

`evaluate.episodes` unseen tracks (seed stream EVAL, never a training track), each played to the env's
full length (`evaluate.max_steps`, default the env's `episode_steps`) and never cut short, spread over
`evaluate.workers` processes that each drive `evaluate.envs_per_worker` envs in lockstep. Logs the
mean, std, min, median and max, every track's score (`scores.csv`), a histogram and GIFs of the best
and the worst track. Scores depend only on the controller and the seeds, not on the worker count.
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from worldmodel import tracking, training
from worldmodel.agent import load_controller
from worldmodel.config import check, is_int, positive_int
from worldmodel.envs import action_space
from worldmodel.scoring import eval_seeds, eval_steps, evaluate, real_scorer


def validate(cfg: DictConfig) -> None:
    positive_int(cfg, "evaluate.episodes", "evaluate.envs_per_worker", "env.episode_steps")
    check(cfg, "evaluate.gif_steps", lambda v: is_int(v) and v >= 0, "an integer ≥ 0")
    for key in ("evaluate.max_steps", "evaluate.workers"):
        check(cfg, key, lambda v: v is None or (is_int(v) and v > 0), "null or a positive integer")


def run(cfg: DictConfig) -> str:
    hp = cfg.evaluate
    evolve_run = tracking.resolve_run(cfg, "evolve", cfg.inputs.evolve, {"latent_size": str(cfg.latent.size)})
    training.check_agent_z(cfg, evolve_run)
    files = training.agent_files(evolve_run)
    controller = load_controller(files["controller"], action_space(cfg.env))
    upstream = {
        "evolve": evolve_run.info.run_id,
        "train_rnn": evolve_run.data.tags["upstream.train_rnn"],
        "train_vae": evolve_run.data.tags["upstream.train_vae"],
    }
    with tracking.stage_run(
        cfg, "evaluate", ["evaluate", "agent"], upstream, {"latent_size": str(cfg.latent.size)}
    ) as run:
        with real_scorer(cfg, "evaluate", files, controller.hparams) as scorer:
            params = controller.get_flat().numpy().astype(np.float32)
            seeds = eval_seeds(cfg, int(hp.episodes))
            evaluate(scorer, params, seeds, eval_steps(cfg), int(hp.gif_steps), int(cfg.dream.fps))
        return run.info.run_id
