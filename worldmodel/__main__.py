"""`python -m worldmodel stage=<name> [overrides]`: one Hydra app dispatching to the chosen stage."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from worldmodel.config import CONFIG_DIR
from worldmodel.errors import WorldModelError
from worldmodel.stages import run_stage

log = logging.getLogger("worldmodel")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def app(cfg: DictConfig) -> None:
    try:
        run_stage(cfg)
    except WorldModelError as err:
        # Expected user-facing problems: one line, no traceback, non-zero exit.
        log.error("%s: %s", cfg.stage.name, err)
        sys.exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
