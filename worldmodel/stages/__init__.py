"""Stage registry: `stage=<name>` → `worldmodel.stages.<name>.run(cfg)`, imported only when chosen."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from worldmodel.config import validate_common


def run_stage(cfg: DictConfig) -> object:
    validate_common(cfg)
    module = importlib.import_module(f"worldmodel.stages.{cfg.stage.name}")
    module.validate(cfg)
    return module.run(cfg)
