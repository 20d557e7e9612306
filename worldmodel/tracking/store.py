"""The MLflow store: which one (`mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else SQLite under
`paths.outputs` with artifacts under `paths.outputs/artifacts`), a probe that fails fast, and one
experiment per env."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from worldmodel.errors import WorldModelError, one_line

# MLflow's own download bars would interleave with ours.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# mlflow.set_tracking_uri exports the URI as $MLFLOW_TRACKING_URI (for subprocesses); a value we put
# there ourselves is not the user's choice and must not outlive a config that points elsewhere.
_exported: str | None = None


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.mlflow.tracking_uri:
        return str(cfg.mlflow.tracking_uri)
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env and from_env != _exported:
        return from_env
    return f"sqlite:///{Path(cfg.paths.outputs).resolve() / 'mlflow.db'}"


def setup(cfg: DictConfig) -> str:
    """Point MLflow at the store and select the experiment; returns the experiment id."""
    global _exported
    uri = tracking_uri(cfg)
    if uri != os.environ.get("MLFLOW_TRACKING_URI"):
        _exported = uri
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        # Jobs of a parallel sweep would otherwise race to create the tables of a new store.
        with FileLock(db.with_name(db.name + ".lock")):
            _probe(uri)
            return _select_experiment(cfg, uri)
    _probe(uri)
    return _select_experiment(cfg, uri)


_answered: set[str] = set()
# For the first request only: MLflow's defaults (7 retries, 120 s each) take minutes to give up.
_PROBE_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _probe(uri: str) -> None:
    """One cheap request to the store, so that a server that does not answer, or a store MLflow
    refuses, fails in one line within seconds and before any work."""
    if uri in _answered:
        return
    scheme = urlparse(uri).scheme
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise WorldModelError(
            f"tracking URI {uri} is a file store, which MLflow 3 refuses; use a database "
            "(sqlite:///<dir>/mlflow.db; unset, mlflow.tracking_uri means the store under paths.outputs)"
        )
    saved = {k: os.environ.get(k) for k in _PROBE_SETTINGS}
    os.environ.update(_PROBE_SETTINGS)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # requests' errors, MlflowException, sqlite's OperationalError
        raise WorldModelError(
            f"tracking URI {uri} does not answer ({one_line(err, 120)}…); start its server, or point "
            "mlflow.tracking_uri (or $MLFLOW_TRACKING_URI) at a store that answers"
        ) from err
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _answered.add(uri)


# MLflow 3's UI asks for an experiment's type until it has one: this is classic model training.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def _select_experiment(cfg: DictConfig, uri: str) -> str:
    name = str(cfg.mlflow.experiment)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        # A local store keeps artifacts beside it; a server decides for itself.
        location = None
        if uri.startswith("sqlite:") or uri.startswith("file:"):
            location = (Path(cfg.paths.outputs).resolve() / "artifacts").as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException:  # created meanwhile by a parallel job of a sweep
            pass
        experiment = mlflow.get_experiment_by_name(name)
    for key, value in EXPERIMENT_TAGS.items():
        if key not in experiment.tags:  # one made before worldmodel set it
            MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id
