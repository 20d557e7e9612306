"""Shared fixtures: configs composed with Hydra's compose API, and a throwaway MLflow store."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import worldmodel  # noqa: F401  (registers the config resolvers)
from worldmodel.config import CONFIG_DIR

Compose = Callable[..., DictConfig]
DATASETS = {"images": np.uint8, "actions": np.float32, "rewards": np.float32, "dones": np.bool_}


def shard_arrays(run_id: str) -> dict[str, np.ndarray]:
    """A collect run's episodes, shard after shard, as arrays."""
    from worldmodel import tracking

    out: dict[str, list[np.ndarray]] = {}
    for name in sorted(tracking.list_artifacts(run_id, "shards")):
        with h5py.File(tracking.artifact_path(run_id, name), "r") as f:
            for key in (*DATASETS, "episode"):
                out.setdefault(key, []).append(f[key][:])
    return {k: np.concatenate(v) for k, v in out.items()}


def children_of(run_id: str) -> dict:
    """The child runs of an MLflow run (a pipeline's stages, a round's), by their `stage` tag."""
    run = mlflow.get_run(run_id)
    found = mlflow.search_runs(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        output_format="list",
    )
    return {c.data.tags["stage"]: c for c in found}


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _no_outside_store() -> Iterator[None]:
    """No MLFLOW_TRACKING_URI from outside, and none left behind: `mlflow.set_tracking_uri` exports it,
    and a session fixture first built in the next test (before this fixture runs) would follow it."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An outputs folder (and so an MLflow store) shared by the tests of one session."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="session")
def smoke(store: Path) -> Compose:
    """Compose `experiment=smoke` into the session's store, plus any overrides."""

    def make(*overrides: str) -> DictConfig:
        return compose_config("experiment=smoke", f"paths.outputs={store}", *overrides)

    return make


@pytest.fixture(scope="session")
def collect_run(smoke: Compose) -> str:
    from worldmodel.stages import run_stage

    return run_stage(smoke("stage=collect"))


@pytest.fixture(scope="session")
def merge_run(smoke: Compose, collect_run: str) -> str:
    from worldmodel.stages import run_stage

    return run_stage(smoke("stage=merge", f"inputs.collect={collect_run}"))


@pytest.fixture(scope="session")
def dataset_path(merge_run: str, smoke: Compose) -> Path:
    from worldmodel import tracking

    tracking.setup(smoke())
    return tracking.artifact_path(merge_run, "dataset.h5")


@pytest.fixture(scope="session")
def vae_run(smoke: Compose, merge_run: str) -> str:
    from worldmodel.stages import run_stage

    return run_stage(smoke("stage=train_vae", f"inputs.merge={merge_run}"))


@pytest.fixture(scope="session")
def encode_run(smoke: Compose, vae_run: str) -> str:
    from worldmodel.stages import run_stage

    return run_stage(smoke("stage=encode", f"inputs.train_vae={vae_run}"))


@pytest.fixture(scope="session")
def rnn_run(smoke: Compose, encode_run: str) -> str:
    from worldmodel.stages import run_stage

    return run_stage(smoke("stage=train_rnn", f"inputs.encode={encode_run}"))


@pytest.fixture(scope="session")
def evolve_run(smoke: Compose, rnn_run: str) -> str:
    from worldmodel.stages import run_stage

    return run_stage(smoke("stage=evolve", f"inputs.train_rnn={rnn_run}"))


def in_order(pool, payloads: list) -> list:
    """A worker pool's results in the order of `payloads` (its `imap_unordered` yields (index, result))."""
    done = dict(pool.imap_unordered(payloads))
    return [done[i] for i in range(len(payloads))]
