"""pipeline: the stages in order in one command, as one parent MLflow run with a child run per stage.

Each child reads its input from the sibling that ran before it (by run id). `pipeline.stages` picks a
contiguous range, e.g. `pipeline.stages=[train_vae,dream] inputs.merge=<run id>` reuses a dataset. The
parent carries the children's headline metrics so a sweep (`-m stage=pipeline latent=z16,z32`)
compares in one table of the MLflow UI.
"""

from __future__ import annotations

import importlib
import logging

import mlflow
from omegaconf import DictConfig, open_dict

from worldmodel import tracking
from worldmodel.config import STAGES, check

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


def validate(cfg: DictConfig) -> None:
    for name in stage_range(cfg):
        importlib.import_module(f"worldmodel.stages.{name}").validate(cfg)


def run(cfg: DictConfig) -> str:
    stages = stage_range(cfg)
    sections = ["env", "policy", "latent", "device", *stages, "pipeline"]
    with tracking.stage_run(cfg, "pipeline", sections, tags={"stages": ",".join(stages)}) as parent:
        pipeline_id = parent.info.run_id
        mlflow.set_tag("pipeline", pipeline_id)
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.mlflow.pipeline = pipeline_id  # tags the children, and scopes their input search
        for name in stages:
            log.info("pipeline: %s", name)
            child = importlib.import_module(f"worldmodel.stages.{name}").run(cfg)
            with open_dict(cfg):
                cfg.inputs[name] = child  # the next stages read this sibling
            metrics = mlflow.get_run(child).data.metrics
            mlflow.log_metrics(
                {dst: metrics[src] for src, dst in HEADLINES.get(name, {}).items() if src in metrics}
            )
            mlflow.set_tag(f"child.{name}", child)
    log.info("pipeline %s finished: %s", pipeline_id, ", ".join(stages))
    return pipeline_id
