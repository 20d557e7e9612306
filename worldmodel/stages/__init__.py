"""Stage registry: `stage=<name>` → `worldmodel.stages.<name>.run(cfg)`, imported only when chosen."""

from __future__ import annotations

import importlib

import mlflow
from omegaconf import DictConfig

from worldmodel.config import validate_common

# The number a sweeper (Optuna) optimises, by stage: the first of these the run logged.
HEADLINE = {
    "collect": ("return_mean",),
    "merge": ("compression_ratio",),
    "train_vae": ("best_val_loss",),
    "encode": (),
    "train_rnn": ("best_val_nll",),
    "evolve": ("eval/score_mean", "best_fitness"),
    "evaluate": ("eval/score_mean",),
    "dream": ("fidelity/spearman", "replay/latent_mse_mean"),
    "play": ("score",),
    "pipeline": ("eval/score_mean", "evolve/best_fitness", "rnn/val_nll", "vae/val_loss"),
}


def headline(stage: str, run_id: str) -> float | None:
    """The stage's headline metric of a finished run: val loss for V and M, score for evolve and evaluate."""
    metrics = mlflow.get_run(run_id).data.metrics
    return next((metrics[k] for k in HEADLINE[stage] if k in metrics), None)


def run_stage(cfg: DictConfig) -> object:
    validate_common(cfg)
    module = importlib.import_module(f"worldmodel.stages.{cfg.stage.name}")
    module.validate(cfg)
    return module.run(cfg)
