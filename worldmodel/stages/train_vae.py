"""train_vae: the convolutional VAE on the frames of a merged dataset.

Trains on the training episodes, validates on the held-out ones every epoch, keeps the best (by
validation loss) and last checkpoints, logs a grid of validation frames over their reconstructions
each epoch and the final model as a torch.export program (MLflow's pt2 format, no pickle).
`inputs.resume=<run id>` continues an interrupted run from its last finished epoch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import h5py
import mlflow
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from worldmodel import tracking, training
from worldmodel.config import check, settings
from worldmodel.config.sections import TrainVAE
from worldmodel.data.datasets import ShuffledFrameBatches, episodes_in
from worldmodel.errors import WorldModelError
from worldmodel.images import mosaic
from worldmodel.models.checkpoints import load_module
from worldmodel.models.vae import SIZES, VAE, VAELoss, to_frames, to_input, vae_loss
from worldmodel.progress import progress_bar
from worldmodel.stages.merge import dataset_of
from worldmodel.tracking import lineage

log = logging.getLogger(__name__)
STAGE = "train_vae"


def validate(cfg: DictConfig) -> None:
    settings(cfg, TrainVAE)
    check(cfg, "env.image_size", lambda v: v in SIZES, f"one of {list(SIZES)} for the VAE")


def run(cfg: DictConfig) -> str:
    merge = tracking.resolve_run(cfg, "merge", cfg.inputs.merge, tracking.compat(cfg, "image_size"))
    dataset, _ = dataset_of(merge.info.run_id)
    device = training.pick_device(cfg)
    tags = tracking.compat(cfg, "image_size", "latent_size")
    hp = settings(cfg, TrainVAE)
    with tracking.stage_run(
        cfg,
        STAGE,
        [STAGE, "latent", "env"],
        {"merge": merge.info.run_id},
        tags,
        resume=cfg.inputs.resume,
        may_change=["train_vae.num_workers", "train_vae.epochs"],
    ) as run:
        tracking.log_dataset(merge.info.run_id, lineage.DATASET, "training")
        torch.manual_seed(cfg.seed)
        model, optimiser, start_epoch, best = _model(cfg, hp, device)
        train, loader = _training_data(hp, dataset, cfg.seed, device)
        hint = f"the dataset is damaged: run merge again (merge run {merge.info.run_id})"
        val_frames = _checked_validation_frames(dataset, hp.val_frames, hint)
        epochs = Epochs(hp, model, optimiser, device, val_frames, lambda: training.reading(dataset, hint))
        checkpoints = training.Checkpoints()
        for epoch in range(start_epoch, hp.epochs):
            train.set_epoch(epoch)
            score = epochs.run(epoch, loader)
            best = checkpoints.save(model, optimiser, epoch, score, best)
        training.log_epoch({"best_val_loss": best}, hp.epochs - 1)
        vae = load_module(VAE, checkpoints.best_path)
        tracking.log_model(vae, (torch.zeros(2, 3, vae.image_size, vae.image_size),))
        return run.info.run_id


def _model(cfg: DictConfig, hp: TrainVAE, device: torch.device) -> tuple[VAE, training.Optimiser, int, float]:
    """V (in the memory layout asked for), its optimiser, and where training starts (resumed or not)."""
    layout = torch.channels_last if hp.channels_last else torch.contiguous_format
    model = VAE(cfg.latent.size, cfg.env.image_size).to(device, memory_format=layout)
    optimiser = training.Optimiser(model, hp.lr)
    start_epoch, best = training.restore(cfg.inputs.resume, model, optimiser)
    return model, optimiser, start_epoch, best


def _training_data(
    hp: TrainVAE, dataset: Path, seed: int, device: torch.device
) -> tuple[ShuffledFrameBatches, DataLoader]:
    train = ShuffledFrameBatches(dataset, hp.batch_size, "train", hp.buffer_frames, seed)
    if train.frames < hp.batch_size:
        raise WorldModelError(
            f"train_vae.batch_size={hp.batch_size} is larger than the {train.frames} "
            "training frames of the dataset"
        )
    loader = DataLoader(
        train,
        batch_size=None,
        num_workers=hp.num_workers,
        persistent_workers=False,
        pin_memory=device.type == "cuda",
    )
    return train, loader


def _checked_validation_frames(dataset: Path, limit: int, hint: str) -> np.ndarray:
    with training.reading(dataset, hint):
        frames = _validation_frames(dataset, limit)
    if frames.min() == frames.max():  # a VAE would learn one colour and report success
        raise WorldModelError(
            f"{dataset}: all {len(frames)} validation frames are the one value {frames.min()}: "
            "the env rendered nothing; check env.frames and env.crop, then collect again"
        )
    return frames


class Epochs:
    """One epoch of V: a training pass, a validation pass, the metrics and the reconstruction grid."""

    def __init__(
        self,
        hp: TrainVAE,
        model: VAE,
        optimiser: training.Optimiser,
        device: torch.device,
        val_frames: np.ndarray,
        reading: Callable[[], AbstractContextManager],
    ) -> None:
        self.model, self.optimiser, self.device, self.val_frames = model, optimiser, device, val_frames
        self.epochs, self.kl_tolerance, self.batch_size = (
            hp.epochs,
            hp.kl_tolerance,
            hp.batch_size,
        )
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=hp.precision == "bf16")
        self.grid = val_frames[np.linspace(0, len(val_frames) - 1, hp.grid_frames, dtype=int)]
        self.reading = reading

    def run(self, epoch: int, loader: DataLoader) -> float:
        """Train and validate once; log the epoch. Returns the validation loss."""
        self.model.train()
        batches = progress_bar(loader, desc=f"train_vae {epoch + 1}/{self.epochs}", unit="batch", leave=False)
        t0, self.frames = time.perf_counter(), 0
        with self.reading():
            train = training.data_pass(
                batches, self._train_loss, self.optimiser, PARTS, f"epoch {epoch}", STAGE
            )
        elapsed = time.perf_counter() - t0
        val = validation(self.model, self.val_frames, self.device, self.kl_tolerance, self.batch_size)
        metrics = {f"train/{k}": v for k, v in train.items()}
        metrics |= {"val/loss": val[0], "val/recon": val[1], "val/kl": val[2]}
        metrics["train/frames_per_s"] = self.frames / elapsed
        training.require_finite(val[0], f"the validation loss of epoch {epoch}", STAGE)
        training.log_epoch(metrics, epoch)
        # An image series: the run page shows it with a step slider over the epochs.
        grid_image = reconstruction_grid(self.model, self.grid, self.device)
        mlflow.log_image(grid_image, key="reconstructions", step=epoch, synchronous=True)
        log.info(
            "train_vae epoch %d: train %.1f, val %.1f (recon %.1f, kl %.1f), %.0f frames/s",
            *(epoch, metrics["train/loss"], val[0], val[1], val[2], metrics["train/frames_per_s"]),
        )
        return float(val[0])

    def _train_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
        x = to_input(batch.to(self.device, non_blocking=True))  # uint8 travels, floats on the device
        with self.autocast:
            recon, mu, logvar = self.model(x)
        out = vae_loss(x, recon.float(), mu.float(), logvar.float(), self.kl_tolerance)
        self.frames += len(x)
        return out.loss, _parts(out, len(x))


PARTS = ("loss", "recon", "kl")


def _parts(out: VAELoss, n: int) -> dict[str, tuple[float, float]]:
    return {"loss": (out.loss.item(), n), "recon": (out.recon.item(), n), "kl": (out.kl.item(), n)}


def _validation_frames(dataset, limit: int) -> np.ndarray:
    """Up to `limit` frames spread over the validation episodes (all episodes if there are none)."""
    episodes = episodes_in(dataset, "val")
    if len(episodes) == 0:
        episodes = episodes_in(dataset, "all")
    with h5py.File(dataset, "r") as f:
        lengths = f["lengths"][:]
        per_episode = max(1, limit // len(episodes))
        frames = []
        for e in episodes:
            steps = np.unique(np.linspace(0, lengths[e] - 1, min(per_episode, lengths[e]), dtype=int))
            frames.append(f["images"][e, steps[0] : steps[-1] + 1][steps - steps[0]])
    return np.concatenate(frames)[:limit]


@torch.no_grad()
def validation(
    model: VAE, frames: np.ndarray, device: torch.device, kl_tolerance: float, batch_size: int
) -> np.ndarray:
    """Mean loss, reconstruction error and KL over `frames`, with a fixed noise seed."""
    model.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)

    def loss_of(i: int) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
        x = to_input(torch.from_numpy(frames[i : i + batch_size]).to(device))
        out = vae_loss(x, *model(x), kl_tolerance)
        return out.loss, _parts(out, len(x))

    means = training.data_pass(range(0, len(frames), batch_size), loss_of, None, PARTS, "validation", STAGE)
    torch.set_rng_state(generator_state)
    return np.array([means["loss"], means["recon"], means["kl"]])


@torch.no_grad()
def reconstruction_grid(model: VAE, frames: np.ndarray, device: torch.device):
    """Validation frames (top row) over their reconstructions from the mean latent (bottom row)."""
    model.eval()
    mu, _ = model.encode(to_input(torch.from_numpy(frames).to(device)))
    recon = to_frames(model.decode(mu))
    return mosaic([*frames, *recon], columns=len(frames))
