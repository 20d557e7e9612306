"""What the training stages share: device choice, checkpoints, resuming and model logging."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import torch
from omegaconf import DictConfig
from torch import nn

from worldmodel import tracking
from worldmodel.checkpoints import load_checkpoint
from worldmodel.errors import WorldModelError

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"


def pick_device(cfg: DictConfig) -> torch.device:
    """`device.type`: auto picks cuda, then mps, then cpu; an explicit choice must be available."""
    kind = str(cfg.device.type)
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise WorldModelError("device=cuda but torch sees no CUDA device; use device=auto or device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise WorldModelError("device=mps but torch sees no MPS device; use device=auto or device=cpu")
    return torch.device(kind)


def checkpoint_of(run_id: str, which: str = "best") -> dict[str, Any]:
    """The `best` or `last` checkpoint of a training run."""
    return load_checkpoint(tracking.artifact_path(run_id, f"{CHECKPOINTS}/{which}.pt"), f"run {run_id}")


def resume_checkpoint(run_id: str | None) -> dict[str, Any] | None:
    """The last checkpoint of an interrupted run being resumed (None when starting afresh)."""
    if not run_id:
        return None
    names = tracking.list_artifacts(run_id, CHECKPOINTS)
    if f"{CHECKPOINTS}/last.pt" not in names:
        log.info("run %s has no checkpoint yet: starting from epoch 0", run_id)
        return None
    return checkpoint_of(run_id, "last")


def log_model(model: nn.Module, name: str = "model") -> None:
    """Log with mlflow.pytorch so `mlflow.pytorch.load_model("runs:/<id>/model")` works (pickled: the
    models return dataclasses, which the pt2 export format cannot trace)."""
    import mlflow.pytorch

    model = model.to("cpu").eval()
    # MLflow warns on every pickled model; the trade-off is explained above, once is enough.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    mlflow.pytorch.log_model(
        model,
        name=name,
        serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)
