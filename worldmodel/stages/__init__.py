"""Stage registry: `stage=<name>` → `worldmodel.stages.<name>.run(cfg)`, imported only when chosen."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from worldmodel.config import validate_common
from worldmodel.errors import WorldModelError

BUILT = ("collect", "merge", "train_vae", "encode", "train_rnn")


def run_stage(cfg: DictConfig) -> object:
    name = cfg.stage.name
    if name not in BUILT:
        raise WorldModelError(f"stage '{name}' is not implemented yet (built: {', '.join(BUILT)})")
    validate_common(cfg)
    module = importlib.import_module(f"worldmodel.stages.{name}")
    module.validate(cfg)
    return module.run(cfg)
