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

import csv
import logging
from dataclasses import dataclass

import mlflow
import numpy as np
import torch
from omegaconf import DictConfig

from worldmodel import tracking
from worldmodel.config import positive_int, settings
from worldmodel.config.sections import Dream, Evaluate
from worldmodel.control.agent import AgentStep, Rollout, load_controller, load_rnn, load_vae
from worldmodel.control.scorer import RealScorer, eval_seeds, eval_steps, real_scorer
from worldmodel.envs.pixels import action_space
from worldmodel.images import save_gif
from worldmodel.tracking import lineage

log = logging.getLogger(__name__)
CHAMPION = "champion"  # the alias of the best agent of an env, on evaluate's standard evaluation


def validate(cfg: DictConfig) -> None:
    settings(cfg, Evaluate)
    positive_int(cfg, "env.episode_steps")


def run(cfg: DictConfig) -> str:
    hp = settings(cfg, Evaluate)
    evolve_run = tracking.resolve_run(cfg, "evolve", cfg.inputs.evolve, tracking.compat(cfg, "latent_size"))
    tracking.check_agent_z(cfg, evolve_run)
    files = tracking.agent_files(evolve_run)
    controller = load_controller(files["controller"], action_space(cfg.env))
    upstream = {"evolve": evolve_run.info.run_id}
    upstream |= {
        stage: tracking.upstream_run(evolve_run, stage).info.run_id for stage in ("train_rnn", "train_vae")
    }
    with tracking.stage_run(
        cfg, "evaluate", ["evaluate", "agent"], upstream, tracking.compat(cfg, "latent_size")
    ) as run:
        with real_scorer(cfg, "evaluate", files, controller.hparams) as scorer:
            params = controller.get_flat().numpy().astype(np.float32)
            seeds = eval_seeds(cfg, hp.episodes)
            result = report(scorer, params, seeds, eval_steps(cfg), hp.gif_steps, settings(cfg, Dream).fps)
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
    info = tracking.log_model(AgentStep(vae, rnn, controller), (frames, h[0], c[0]), "agent", name)
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


# ---- the evaluation report, shared with evolve's final evaluation ------------------------------


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


def report(
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
    with tracking.artifact(lineage.SCORES) as path, open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "score", "steps"])
        writer.writerows(zip(result.seeds, result.scores.round(3), result.steps, strict=True))
    with tracking.artifact(lineage.HISTOGRAM) as path:
        _histogram(result.scores, path)
    if gif_steps:
        # never past the scored episodes' end (evaluate.max_steps may be below gif_steps)
        _gifs(scorer, every, list(seeds), rollouts, min(gif_steps, max_steps), fps)
    m = result.metrics
    log.info(
        "evaluation over %d unseen episodes: %.1f ± %.1f (min %.1f, median %.1f, max %.1f)",
        *(len(seeds), m["eval/score_mean"], m["eval/score_std"], m["eval/score_min"]),
        *(m["eval/score_median"], m["eval/score_max"]),
    )
    return result


def _gifs(
    scorer: RealScorer, every: np.ndarray, seeds: list[int], rollouts: list[Rollout], steps: int, fps: int
) -> None:
    """GIFs of the best and the worst track (real | reconstruction): their first `steps` steps replayed,
    each checked against the same steps of the scored episode."""
    scores = np.array([r.score for r in rollouts])
    picked = {"best": int(scores.argmax()), "worst": int(scores.argmin())}
    replays = scorer.replay(every, seeds, list(picked.values()), steps)
    for name, i in picked.items():
        expected = float(np.sum(rollouts[i].rewards[:steps]))
        if not np.isclose(replays[i].score, expected):
            log.warning(
                "the %s track replayed to %.1f in %d steps, not %.1f", name, replays[i].score, steps, expected
            )
        with tracking.artifact(f"gifs/{name}_track.gif") as path:
            save_gif(replays[i].frames, path, fps)


def _histogram(scores: np.ndarray, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(scores, bins=min(30, max(5, len(scores) // 3)), color="#3a7ca5", edgecolor="white")
    ax.axvline(scores.mean(), color="#d1495b", label=f"mean {scores.mean():.0f} ± {scores.std():.0f}")
    ax.set_xlabel("score")
    ax.set_ylabel("tracks")
    ax.set_title(f"{len(scores)} unseen episodes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
