"""evaluate: the standard score of an evolve run's controller, and the registered agent.

`evaluate.episodes` unseen tracks (seed stream EVAL, never a training track), each played to the env's
full length (`evaluate.max_steps`, default the env's `episode_steps`) and never cut short, spread over
`evaluate.workers` processes that each drive `evaluate.envs_per_worker` envs in lockstep. Logs the
mean, std, min, median and max, every track's score (`scores.csv`), a histogram and GIFs of the best
and the worst track. Scores depend only on the controller and the seeds, not on the worker count.

V, M and C are logged as one pt2 model (`agent`: frames, h, c → action, h, c), a version of the
registered model `agent-<env>`; its alias `champion` moves to the version that beats it on the same
evaluation, so `mlflow.pytorch.load_model("models:/agent-carracing@champion")` is the best agent.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import torch
from omegaconf import DictConfig

from worldmodel import tracking, training
from worldmodel.agent import AgentStep, load_controller, load_rnn, load_vae
from worldmodel.config import check, is_int, positive_int
from worldmodel.envs import action_space
from worldmodel.scoring import eval_seeds, eval_steps, evaluate, real_scorer

log = logging.getLogger(__name__)
CHAMPION = "champion"  # the alias of the best agent of an env, on evaluate's standard evaluation


def validate(cfg: DictConfig) -> None:
    positive_int(cfg, "evaluate.episodes", "evaluate.envs_per_worker", "env.episode_steps")
    check(cfg, "evaluate.gif_steps", lambda v: is_int(v) and v >= 0, "an integer ≥ 0")
    check(cfg, "evaluate.register", lambda v: isinstance(v, bool), "true or false")
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
            result = evaluate(scorer, params, seeds, eval_steps(cfg), int(hp.gif_steps), int(cfg.dream.fps))
        if hp.register:
            register_agent(cfg, files, controller, result.metrics["eval/score_mean"])
        return run.info.run_id


def register_agent(cfg: DictConfig, files: dict[str, str], controller, score: float) -> None:
    """Log V, M and C as one pt2 model (`agent`), as a version of the registered model `agent-<env>`, and
    move its `champion` alias here when this score beats the champion's on the same evaluation (the
    same tracks and length), or when there is none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    vae, rnn = load_vae(files["vae"]), load_rnn(files["rnn"])
    h, c = rnn.initial_state(2)
    frames = torch.zeros(2, vae.image_size, vae.image_size, 3, dtype=torch.uint8)
    name = f"agent-{cfg.env.name}"
    info = training.log_model(AgentStep(vae, rnn, controller), (frames, h[0], c[0]), "agent", name)
    client, version = MlflowClient(), str(info.registered_model_version)
    evaluation = f"seed={cfg.seed} episodes={cfg.evaluate.episodes} max_steps={eval_steps(cfg)}"
    client.set_model_version_tag(name, version, "evaluation", evaluation)
    client.set_model_version_tag(name, version, "score", repr(float(score)))  # exact, to compare
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is None or (
        champion.tags.get("evaluation") == evaluation and float(champion.tags.get("score", "-inf")) < score
    ):
        client.set_registered_model_alias(name, CHAMPION, version)
        mlflow.set_tag("champion", "true")
        log.info("evaluate: %s version %s is the new %s (%.1f)", name, version, CHAMPION, score)
