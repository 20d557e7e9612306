"""What the training stages share: device choice, checkpoints, resuming and model logging."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Run
from omegaconf import DictConfig
from torch import nn

from worldmodel import tracking
from worldmodel.checkpoints import load_checkpoint, save_checkpoint
from worldmodel.errors import WorldModelError

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"


@contextlib.contextmanager
def reading(path: Path, hint: str) -> Iterator[None]:
    """Turn a read error of an input file (a damaged chunk fails its checksum or decompression, in this
    process or in a DataLoader worker) into one line naming the file and what to do."""
    try:
        yield
    except OSError as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise WorldModelError(f"{path}: cannot be read ({lines[-1] if lines else err!r}); {hint}") from err


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


def checkpoint_path(run_id: str, which: str = "best") -> Path:
    """A local path to the `best` or `last` checkpoint of a training run."""
    return tracking.artifact_path(run_id, f"{CHECKPOINTS}/{which}.pt")


def checkpoint_of(run_id: str, which: str = "best") -> dict[str, Any]:
    """The `best` or `last` checkpoint of a training run."""
    return load_checkpoint(checkpoint_path(run_id, which), f"run {run_id}")


@dataclass
class World:
    """The learned world a controller lives in: an MDN-RNN run, the VAE run and encode run behind it."""

    rnn_run: Run
    vae_run: Run
    encode_id: str

    def dream_starts(self, cfg: DictConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Where dreams start: the (mu, logvar) of the training episodes' first frames, or nothing
        (`evolve.initial_z=normal`: z ~ N(0, I), as `initial_latents` takes it)."""
        if cfg.evolve.initial_z == "normal":
            return None, None
        return first_frames(self.encode_id, int(cfg.latent.size))

    @property
    def upstream(self) -> dict[str, str]:
        return {
            "train_rnn": self.rnn_run.info.run_id,
            "train_vae": self.vae_run.info.run_id,
            "encode": self.encode_id,
        }


def first_frames(encode_id: str, latent_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu, logvar) of the first frames of an encode run's training episodes: where dreams start."""
    from worldmodel.data import latents
    from worldmodel.data.datasets import episodes_in

    path = tracking.artifact_path(encode_id, "latents.h5")
    latents.inspect(path, latent_size)
    return latents.first_steps(path, episodes_in(path, "train"))


def resolve_world(cfg: DictConfig) -> World:
    """The MDN-RNN run (`inputs.train_rnn` or the latest compatible) and the VAE it was trained on."""
    compat = {"latent_size": str(cfg.latent.size)}
    rnn_run = tracking.resolve_run(cfg, "train_rnn", cfg.inputs.train_rnn, compat)
    vae_id = cfg.inputs.train_vae or rnn_run.data.tags.get("upstream.train_vae")
    vae_run = tracking.resolve_run(cfg, "train_vae", vae_id, compat | {"image_size": str(cfg.env.image_size)})
    return World(rnn_run, vae_run, rnn_run.data.tags["upstream.encode"])


def check_agent_z(cfg: DictConfig, upstream: Run) -> None:
    """`agent.z` must be what the upstream run was made with (where it records one)."""
    made = upstream.data.params.get("agent.z")
    if made is not None and made != str(cfg.agent.z):
        raise WorldModelError(
            f"config key 'agent.z' is {cfg.agent.z} but {upstream.data.tags.get('stage', 'run')} run "
            f"{upstream.info.run_id} was made with agent.z={made}; set agent.z={made} or use another run"
        )


def agent_files(evolve_run: Run) -> dict[str, str]:
    """Local paths of an evolve run's controller and the VAE and MDN-RNN checkpoints it acts through."""
    tags = evolve_run.data.tags
    return {
        "controller": str(tracking.artifact_path(evolve_run.info.run_id, "controller.pt")),
        "vae": str(checkpoint_path(tags["upstream.train_vae"])),
        "rnn": str(checkpoint_path(tags["upstream.train_rnn"])),
    }


def restore(run_id: str | None, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Continue an interrupted run (`inputs.resume`) from its last checkpoint: weights, optimizer, torch's
    random state. Returns the first epoch still to train and the best validation score so far."""
    if not run_id:
        return 0, float("inf")
    if f"{CHECKPOINTS}/last.pt" not in tracking.list_artifacts(run_id, CHECKPOINTS):
        log.info("run %s has no checkpoint yet: starting from epoch 0", run_id)
        return 0, float("inf")
    ckpt = checkpoint_of(run_id, "last")
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    log.info("resuming run %s after epoch %d", run_id, ckpt["epoch"])
    return int(ckpt["epoch"]) + 1, float(ckpt["best_val"])


def require_finite(value: float, what: str, stage: str) -> None:
    """Stop a training run whose loss became NaN or inf (its inputs are checked finite as they are
    read, so the model diverged), before a NaN checkpoint or metric is written."""
    if not math.isfinite(value):
        raise WorldModelError(
            f"{stage}: {what} is {value}: training diverged; lower {stage}.lr (or clip gradients harder)"
        )


def checkpoint_epoch(
    ckpt_dir: Path,
    in_place: bool,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    score: float,
    best: float,
) -> float:
    """End of an epoch: `best.pt` when the validation `score` beats `best` (lower is better), and always
    `last.pt` with what resuming needs. Returns the best score so far."""
    if score < best:
        best = score
        save_checkpoint(ckpt_dir / "best.pt", model, epoch=epoch, best_val=best)
        tracking.publish(ckpt_dir / "best.pt", CHECKPOINTS, in_place)
    save_checkpoint(
        ckpt_dir / "last.pt",
        model,
        epoch=epoch,
        best_val=best,
        optimizer=optimizer.state_dict(),
        rng=torch.get_rng_state(),
    )
    tracking.publish(ckpt_dir / "last.pt", CHECKPOINTS, in_place)
    return best


class MDNRNNStep(nn.Module):
    """The MDN-RNN's one-step interface with plain tensors in and out, as torch.export needs:
    (z, a, h, c) → (log_pi, mu, log_sigma, reward, done_logit, h, c)."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, z: torch.Tensor, a: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple:
        out, (h, c) = self.rnn.step(z, a, (h.unsqueeze(0), c.unsqueeze(0)))
        m = out.mixture
        return m.log_pi, m.mu, m.log_sigma, out.reward, out.done_logit, h[0], c[0]


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


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)
