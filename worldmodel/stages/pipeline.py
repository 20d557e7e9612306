"""pipeline: the stages in order in one command, as one parent MLflow run with a child run per stage.

Each child reads its input from the sibling that ran before it (by run id). `pipeline.stages` picks a
contiguous range, e.g. `pipeline.stages=[train_vae,dream] inputs.merge=<run id>` reuses a dataset. The
parent carries the children's headline metrics so a sweep (`-m stage=pipeline latent=z16,z32`)
compares in one table of the MLflow UI.

`pipeline.rounds` > 0 adds the paper's iterative procedure after the stages (or after `inputs.evolve`,
e.g. `pipeline.stages=[evaluate,evaluate] inputs.evolve=<id>`): each round is a child run (tag `round`)
whose own children collect `pipeline.round_episodes` new episodes with the latest controller (its
actions perturbed by `pipeline.round_noise` over `pipeline.round_noise_steps`, as `policy.noise` does) and
`pipeline.round_random_episodes` with random linear controllers acting through that controller's M (data
of C's own kind, as Dropout's Dream Land's 10 %), merge them with every episode so far, encode them with
the same VAE, retrain M, evolve and evaluate. `pipeline.round_config` is merged into the config of every
round, so the rounds can differ from the first pass: `{evolve: {mode: dream}}` evolves in the dream
after a real-mode first controller collected the data (Dropout's Dream Land's setting). The parent's
headline metrics are those of the last round.
"""

from __future__ import annotations

import importlib
import logging

import mlflow
from omegaconf import DictConfig, OmegaConf, open_dict

from worldmodel import tracking
from worldmodel.config import CONFIG_DIR, STAGES, check, is_int, non_negative_numbers, positive_int, resumable
from worldmodel.seeds import ROUND, ROUND_RANDOM, seed_of

log = logging.getLogger(__name__)
# child metric → parent metric
HEADLINES = {
    "collect": {"return_mean": "collect/return_mean", "frames": "collect/frames"},
    "merge": {"compression_ratio": "merge/compression_ratio"},
    "train_vae": {"best_val_loss": "vae/val_loss", "val/recon": "vae/val_recon"},
    "train_rnn": {"best_val_nll": "rnn/val_nll", "val/baseline_nll": "rnn/baseline_nll"},
    "evolve": {"best_fitness": "evolve/best_fitness"},
    "evaluate": {
        "eval/score_mean": "eval/score_mean",
        "eval/score_std": "eval/score_std",
        "eval/score_median": "eval/score_median",
        "eval/episodes": "eval/episodes",
    },
    "dream": {"replay/latent_mse_mean": "dream/latent_mse"},
}


def stage_range(cfg: DictConfig) -> list[str]:
    check(
        cfg,
        "pipeline.stages",
        lambda v: len(v) == 2 and all(s in STAGES for s in v) and STAGES.index(v[0]) <= STAGES.index(v[1]),
        f"[first, last] of {list(STAGES)} in that order",
    )
    first, last = cfg.pipeline.stages
    return list(STAGES[STAGES.index(first) : STAGES.index(last) + 1])


ROUND_STAGES = ("collect", "merge", "encode", "train_rnn", "evolve", "evaluate")


def validate(cfg: DictConfig) -> None:
    stages = stage_range(cfg)
    resumable(cfg, stages[0])
    for i, name in enumerate(stages):
        importlib.import_module(f"worldmodel.stages.{name}").validate(cfg if i == 0 else _fresh(cfg))
    check(cfg, "pipeline.rounds", lambda v: is_int(v) and v >= 0, "an integer ≥ 0")
    if cfg.pipeline.rounds:
        positive_int(cfg, "pipeline.round_episodes")
        check(cfg, "pipeline.round_random_episodes", lambda v: is_int(v) and v >= 0, "an integer ≥ 0")
        non_negative_numbers(cfg, "pipeline.round_noise")
        positive_int(cfg, "pipeline.round_noise_steps")
        _check_round_config(cfg)
        check(
            cfg,
            "pipeline.stages",
            lambda v: "evolve" in stages or cfg.inputs.evolve,
            "a range that includes evolve when pipeline.rounds > 0 (or give inputs.evolve to start from)",
        )


def _check_round_config(cfg: DictConfig) -> None:
    """`pipeline.round_config` holds sections of this config, and the rounds' stages accept the result."""
    check(
        cfg,
        "pipeline.round_config",
        lambda v: (
            v is None
            or all(OmegaConf.is_dict(cfg.get(k)) and k not in ("pipeline", "inputs", "policy") for k in v)
        ),
        "null or a mapping of config sections (e.g. {evolve: {mode: dream}}) but pipeline, inputs, policy",
    )
    rounds = _fresh(cfg)
    with open_dict(rounds):
        for section, values in (cfg.pipeline.round_config or {}).items():
            rounds[section] = OmegaConf.merge(rounds[section], values)
    for name in ROUND_STAGES[1:]:
        importlib.import_module(f"worldmodel.stages.{name}").validate(rounds)


def run(cfg: DictConfig) -> str:
    stages = stage_range(cfg)
    sections = ["env", "policy", "latent", "device", *stages, "pipeline"]
    with tracking.stage_run(cfg, "pipeline", sections, tags={"stages": ",".join(stages)}) as parent:
        pipeline_id = parent.info.run_id
        mlflow.set_tag("pipeline", pipeline_id)
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.mlflow.pipeline = pipeline_id  # tags the children, and scopes their input search
        _run_stages(cfg, stages)
        for k in range(1, int(cfg.pipeline.rounds) + 1):
            _round(cfg, k)
    log.info("pipeline %s finished: %s", pipeline_id, ", ".join(stages))
    return pipeline_id


def _fresh(cfg: DictConfig) -> DictConfig:
    """`inputs.resume` names a run of the first stage only; the later stages start new runs."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.inputs.resume = None
    return cfg


def _run_stages(cfg: DictConfig, stages: list[str] | tuple[str, ...]) -> None:
    """Run `stages` in order under the active run; each reads its predecessors through `cfg.inputs`."""
    for name in stages:
        log.info("pipeline: %s", name)
        child = importlib.import_module(f"worldmodel.stages.{name}").run(cfg)
        with open_dict(cfg):
            cfg.inputs[name] = child  # the next stages read this sibling
            cfg.inputs.resume = None  # it resumed the first stage, if any
        metrics = mlflow.get_run(child).data.metrics
        mlflow.log_metrics(
            {dst: metrics[src] for src, dst in HEADLINES.get(name, {}).items() if src in metrics}
        )
        mlflow.set_tag(f"child.{name}", child)


def _round(cfg: DictConfig, k: int) -> None:
    """One round of the iterative procedure, from the latest evolve run in `cfg.inputs.evolve`."""
    evolve = mlflow.get_run(cfg.inputs.evolve)
    encode = tracking.upstream_run(evolve, "encode")
    merge = tracking.upstream_run(encode, "merge")
    policy = OmegaConf.load(CONFIG_DIR / "policy" / "controller.yaml")
    policy.run_id = evolve.info.run_id
    policy.noise = cfg.pipeline.get("round_noise", 0.0)
    policy.noise_steps = cfg.pipeline.get("round_noise_steps", policy.noise_steps)
    with open_dict(cfg):
        for section, values in (cfg.pipeline.round_config or {}).items():
            cfg[section] = OmegaConf.merge(cfg[section], values)
        cfg.policy = policy
        cfg.seed = seed_of(cfg.seed, ROUND, k) % 2**31  # new tracks for the new episodes
        cfg.collect.episodes = int(cfg.pipeline.round_episodes)
        cfg.inputs.collect = None
        cfg.inputs.train_vae = tracking.upstream_run(evolve, "train_vae").info.run_id  # V is kept
    with tracking.stage_run(cfg, "round", ["pipeline"], tags={"round": str(k)}) as run:
        log.info("pipeline: round %d, collecting with controller %s", k, evolve.info.run_id)
        _run_stages(cfg, ROUND_STAGES[:1])
        new = [cfg.inputs.collect, *_random_linear_collect(cfg, evolve, k)]
        with open_dict(cfg):  # every episode so far: the earlier collect runs and this round's
            cfg.inputs.collect = [*tracking.upstream(merge, "collect").split(","), *new]
        _run_stages(cfg, ROUND_STAGES[1:])
    mlflow.log_metrics(mlflow.get_run(run.info.run_id).data.metrics)  # the parent shows the last round
    mlflow.set_tag(f"child.round_{k}", run.info.run_id)


def _random_linear_collect(cfg: DictConfig, evolve, k: int) -> list[str]:
    """Round k's `pipeline.round_random_episodes` episodes of random linear controllers on [z, h], read
    through the M of the controller that collected this round (none when the count is 0)."""
    episodes = int(cfg.pipeline.get("round_random_episodes") or 0)
    if not episodes:
        return []
    cfg = cfg.copy()
    policy = OmegaConf.load(CONFIG_DIR / "policy" / "linear_random.yaml")
    rnn = tracking.upstream_run(evolve, "train_rnn")
    policy.run_id = rnn.info.run_id
    with open_dict(cfg):
        cfg.policy = policy
        cfg.agent.z = rnn.data.params.get("agent.z", cfg.agent.z)  # as that M was trained
        cfg.seed = seed_of(cfg.seed, ROUND_RANDOM, k) % 2**31  # tracks of their own
        cfg.collect.episodes = episodes
    log.info("pipeline: round %d, %d episodes of random linear controllers", k, episodes)
    child = importlib.import_module("worldmodel.stages.collect").run(cfg)
    mlflow.set_tag("child.collect_linear_random", child)
    return [child]
