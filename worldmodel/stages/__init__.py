"""Stage registry: `stage=<name>` → `worldmodel.stages.<name>.run(cfg)`, imported only when chosen."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import mlflow
from omegaconf import DictConfig

from worldmodel.config import STAGES, TOOLS, validate_common
from worldmodel.envs.pixels import register
from worldmodel.parallel.pool import check_backend

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


def run_stage(cfg: DictConfig, overrides: Iterable[str] = ()) -> object:
    """Validate, then run the chosen stage. Every stage section named in `overrides` (the command
    line's) is validated too, whichever stage runs: a typo in a section the stage does not read
    (`stage=collect evolve.mode=drem`) fails before any work, as in the section it does."""
    validate_common(cfg)
    register(cfg.env)  # an optional extra's env (env=doom) fails here, before any run is created
    check_backend(cfg.backend)
    module = importlib.import_module(f"worldmodel.stages.{cfg.stage.name}")
    module.validate(cfg)
    for section in sorted(_sections(overrides) - {str(cfg.stage.name)}):
        importlib.import_module(f"worldmodel.stages.{section}").validate(cfg)
    return module.run(cfg)


def _sections(overrides: Iterable[str]) -> set[str]:
    """The stage sections that `overrides` set (`evolve.mode=dream` → evolve)."""
    keys = (o.lstrip("+~").split("=", 1)[0] for o in overrides)
    return {key.split(".", 1)[0] for key in keys if "." in key} & {*STAGES, *TOOLS, "pipeline"}
