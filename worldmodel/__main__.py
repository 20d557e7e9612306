"""`python -m worldmodel stage=<name> [overrides]`: one Hydra app dispatching to the chosen stage."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from worldmodel.config import CONFIG_DIR, RESUMABLE, refuse_added_keys
from worldmodel.errors import WorldModelError
from worldmodel.files import disk_error
from worldmodel.stages import headline, run_stage

log = logging.getLogger("worldmodel")


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (kill, a scheduler, docker stop) takes Ctrl-C's path: the run ends KILLED, partial files
    # are removed and the workers stopped.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _redeliver(unraisable: sys.UnraisableHookArgs) -> None:
    # An interrupt raised while a finalizer or weakref callback ran is swallowed ("Exception ignored
    # in ..."); send the signal again, from another thread so that it lands after the hook, until it
    # reaches the stage.
    err = unraisable.exc_value
    if isinstance(err, KeyboardInterrupt):
        again = signal.SIGTERM if str(err) == "SIGTERM" else signal.SIGINT
        threading.Timer(0.01, os.kill, (os.getpid(), again)).start()
        return
    sys.__unraisablehook__(unraisable)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def app(cfg: DictConfig) -> float | None:
    """Runs the stage; returns its headline metric (`stages.HEADLINE`), for sweepers that optimise."""
    signal.signal(signal.SIGTERM, _terminate)
    sys.unraisablehook = _redeliver
    try:
        hydra_cfg = HydraConfig.get()
        refuse_added_keys(hydra_cfg.overrides.task, hydra_cfg.runtime.choices.keys())
        return headline(str(cfg.stage.name), str(run_stage(cfg, hydra_cfg.overrides.task)))
    except WorldModelError as err:
        # Expected user-facing problems: one line, no traceback, non-zero exit.
        log.error("%s: %s", cfg.stage.name, err)
        sys.exit(2)
    except Exception as err:  # a full disk or a refused write, wherever it struck, is one line too
        if (disk := disk_error(err)) is None:
            raise
        log.error("%s: %s", cfg.stage.name, disk)
        sys.exit(2)
    except KeyboardInterrupt as err:
        why, stage = str(err) or "SIGINT", str(cfg.stage.name)
        run_id = getattr(err, "run_id", None)
        how = (
            f"resume it with `stage={stage} inputs.resume={run_id}`"
            if stage in RESUMABLE and run_id
            else "run it again"
        )
        log.error("%s: interrupted (%s); its MLflow run ends KILLED: %s", stage, why, how)
        sys.exit(128 + getattr(signal, why, signal.SIGINT))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
