"""Hydra callbacks (`hydra.callbacks` in conf/config.yaml): what must happen around Hydra's own steps."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from worldmodel.errors import WorldModelError
from worldmodel.files import check_room
from worldmodel.tracking.sweeps import summarise_jobs

SWEEP_RUN = "WORLDMODEL_SWEEP_RUN"  # the sweep's parent run id, for every job (in any launcher)


class OutputsCheck(Callback):
    """A Hydra callback: `paths.outputs` must be writable before Hydra creates its run directory there
    (Hydra's own mkdir would fail with a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        try:
            check_room(Path(config.paths.outputs), 0, f"stage={config.stage.name}")
        except WorldModelError as err:
            print(f"{config.stage.name}: {err}", file=sys.stderr)  # logging is not set up yet
            sys.exit(2)


class SweepRun(Callback):
    """A parent MLflow run per sweep (`-m`): every job's run is its child, so the UI groups a sweep. The
    id travels to the jobs in $WORLDMODEL_SWEEP_RUN (a launcher's worker processes inherit it).

    At the end, the parent carries each metric of its finished jobs over the jobs (`jobs/mean/<metric>`,
    `jobs/std/<metric>`, min and max), and the table behind them (`jobs.csv`): a sweep over `seed=0,1,2`
    reports the score over training seeds in one run."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        from worldmodel import tracking

        experiment = tracking.setup(config)
        swept = list(config.hydra.overrides.task)  # HydraConfig is not set yet
        tags = {
            "stage": "sweep",
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "sweep": " ".join(swept),
        }
        run = MlflowClient().create_run(experiment, tags=tags, run_name=tracking.run_name("sweep", swept))
        os.environ[SWEEP_RUN] = self.run_id = run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        if getattr(self, "run_id", None):
            client = MlflowClient()
            best = Path(config.hydra.sweep.dir) / "optimization_results.yaml"  # an optimising sweeper's
            if best.is_file():
                result = OmegaConf.load(best)
                client.log_metric(self.run_id, "best/value", float(result.best_value))
                for key, value in result.best_params.items():
                    client.log_param(self.run_id, f"best.{key}", value)
            summarise_jobs(client, self.run_id)
            client.set_terminated(self.run_id, "FINISHED")
            os.environ.pop(SWEEP_RUN, None)
