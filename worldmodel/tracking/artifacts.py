"""Artifacts: where the active run writes its files, and how another run's files are read."""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from worldmodel import files
from worldmodel.errors import WorldModelError, one_line


class OutputDir:
    """Where the active run writes its artifacts under `subpath`. For a local store this is the run's
    own artifact folder, so large files are written once, in place; for a remote store it is a staging
    folder, and `publish` uploads each file as it completes."""

    def __init__(self, subpath: str = "") -> None:
        self.subpath = subpath
        parsed = urlparse(mlflow.get_artifact_uri())
        self.in_store = parsed.scheme in ("", "file")
        if self.in_store:
            self.path = Path(unquote(parsed.path)) / subpath
        else:
            staging = Path(os.environ.get("TMPDIR", "/tmp")) / "worldmodel-staging"
            self.path = staging / mlflow.active_run().info.run_id / subpath
        self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def publish(self, file: Path) -> None:
        """Make a finished file visible as an artifact (a no-op where it was written in place)."""
        if not self.in_store:
            mlflow.log_artifact(str(file), self.subpath)


@contextlib.contextmanager
def artifact(name: str) -> Iterator[Path]:
    """A path to write the active run's artifact `name` (e.g. "scores.csv", "gifs/best.gif") to. The file
    is written under a `.partial` name (its extension kept, for writers that go by it) and becomes the
    artifact only when the block completes; on an error nothing is left under the final name."""
    subdir, _, filename = name.rpartition("/")
    out = OutputDir(subdir)
    with files.atomic(out / filename) as partial:
        yield partial
    out.publish(out / filename)


def artifact_path(run_id: str, path: str) -> Path:
    """A local path to an artifact of a run: in place for a local store, downloaded otherwise."""
    try:
        # By URI, not run id: a local store then answers with the file in place instead of a copy.
        uri = mlflow.get_run(run_id).info.artifact_uri.rstrip("/")
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{path}" if path else uri))
    except (MlflowException, OSError) as err:
        raise WorldModelError(
            f"run {run_id} has no artifact '{path}' ({err.__class__.__name__}); "
            "was it produced by this version of worldmodel?"
        ) from err


def log_dataset(producer: str, name: str, context: str) -> None:
    """Record artifact `name` of run `producer` as an input of the active run (`mlflow.log_input`), so
    the run page lists it under Datasets, with its source, a digest and the producing run."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    uri = f"{mlflow.get_run(producer).info.artifact_uri.rstrip('/')}/{name}"
    try:
        with warnings.catch_warnings():  # a local path reads as two kinds of local source
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(uri)
    except MlflowException:  # mlflow-artifacts:/ (a team server) has no resolver of its own
        source = HTTPDatasetSource(uri)
    digest = hashlib.sha256(f"{producer}/{name}".encode()).hexdigest()[:16]  # written once per run
    dataset = MetaDataset(source, name=f"{name.rpartition('/')[2]}@{producer[:8]}", digest=digest)
    mlflow.log_input(dataset, context=context, tags={"producer_run": producer, "artifact": name})


def list_artifacts(run_id: str, path: str) -> list[str]:
    try:
        return [a.path for a in MlflowClient().list_artifacts(run_id, path) if not a.is_dir]
    except MlflowException as err:  # e.g. a folder symlinked out of the store, which MLflow refuses
        raise WorldModelError(
            f"run {run_id}: cannot list its artifacts '{path}' ({one_line(err, 120)})"
        ) from err


def log_model(
    model: nn.Module,
    examples: tuple[torch.Tensor, ...],
    name: str = "model",
    registered_model_name: str | None = None,
) -> Any:
    """Log as a torch.export program (MLflow's "pt2" format: a traced graph and raw tensors, nothing
    that runs code on load), so `mlflow.pytorch.load_model("runs:/<id>/model")` returns a callable
    module. The batch dimension of every input is dynamic. Returns MLflow's ModelInfo."""
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    specs = [
        TensorSpec(np.dtype(x.numpy().dtype), (-1, *x.shape[1:]), name=f"input_{i}")
        for i, x in enumerate(examples)
    ]
    return mlflow.pytorch.log_model(
        model.to("cpu").eval(),
        name=name,
        serialization_format="pt2",
        input_example=examples,
        signature=ModelSignature(Schema(specs)),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        registered_model_name=registered_model_name,
    )
