"""train_vae: the convolutional VAE on the frames of a merged dataset.

Trains on the training episodes, validates on the held-out ones every epoch, keeps the best (by
validation loss) and last checkpoints, logs a grid of validation frames over their reconstructions
each epoch and the final model as a torch.export program (MLflow's pt2 format, no pickle).
`inputs.resume=<run id>` continues an interrupted run from its last finished epoch.
"""

from __future__ import annotations

import logging
import time

import h5py
import mlflow
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from worldmodel import tracking, training
from worldmodel.checkpoints import load_module
from worldmodel.config import check, is_int, one_of, positive_int, positive_number
from worldmodel.data.datasets import ShuffledFrameBatches, episodes_in
from worldmodel.errors import WorldModelError
from worldmodel.images import mosaic
from worldmodel.models.vae import SIZES, VAE, to_frames, to_input, vae_loss
from worldmodel.progress import progress_bar
from worldmodel.stages.merge import dataset_of

log = logging.getLogger(__name__)
STAGE = "train_vae"


def validate(cfg: DictConfig) -> None:
    positive_int(
        cfg,
        "train_vae.epochs",
        "train_vae.batch_size",
        "train_vae.buffer_frames",
        "train_vae.val_frames",
        "train_vae.grid_frames",
    )
    positive_number(cfg, "train_vae.lr")
    check(cfg, "train_vae.kl_tolerance", lambda v: v >= 0, "a number ≥ 0")
    check(cfg, "train_vae.num_workers", lambda v: is_int(v) and v >= 0, "an integer ≥ 0")
    one_of(cfg, "train_vae.precision", ["fp32", "bf16"])
    check(cfg, "train_vae.channels_last", lambda v: isinstance(v, bool), "true or false")
    check(cfg, "env.image_size", lambda v: v in SIZES, f"one of {list(SIZES)} for the VAE")


def run(cfg: DictConfig) -> str:
    merge = tracking.resolve_run(cfg, "merge", cfg.inputs.merge, {"image_size": str(cfg.env.image_size)})
    dataset, _ = dataset_of(merge.info.run_id)
    device = training.pick_device(cfg)
    hp = cfg.train_vae
    tags = {"image_size": str(cfg.env.image_size), "latent_size": str(cfg.latent.size)}

    with tracking.stage_run(
        cfg,
        STAGE,
        [STAGE, "latent", "env"],
        {"merge": merge.info.run_id},
        tags,
        resume=cfg.inputs.resume,
        may_change=["train_vae.num_workers", "train_vae.epochs"],
    ) as run:
        tracking.log_dataset(merge.info.run_id, "dataset.h5", "training")
        torch.manual_seed(cfg.seed)
        layout = torch.channels_last if hp.channels_last else torch.contiguous_format
        model = VAE(int(cfg.latent.size), int(cfg.env.image_size)).to(device, memory_format=layout)
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=hp.precision == "bf16")
        optimizer = torch.optim.Adam(model.parameters(), lr=float(hp.lr))
        start_epoch, best = training.restore(cfg.inputs.resume, model, optimizer)

        train = ShuffledFrameBatches(
            dataset, int(hp.batch_size), "train", int(hp.buffer_frames), int(cfg.seed)
        )
        if train.frames < hp.batch_size:
            raise WorldModelError(
                f"train_vae.batch_size={hp.batch_size} is larger than the {train.frames} "
                "training frames of the dataset"
            )
        loader = DataLoader(
            train,
            batch_size=None,
            num_workers=int(hp.num_workers),
            persistent_workers=False,
            pin_memory=device.type == "cuda",
        )
        damaged = f"the dataset is damaged: run merge again (merge run {merge.info.run_id})"
        with training.reading(dataset, damaged):
            val_frames = _validation_frames(dataset, int(hp.val_frames))
        if val_frames.min() == val_frames.max():  # a VAE would learn one colour and report success
            raise WorldModelError(
                f"{dataset}: all {len(val_frames)} validation frames are the one value {val_frames.min()}: "
                "the env rendered nothing; check env.frames and env.crop, then collect again"
            )
        grid = val_frames[np.linspace(0, len(val_frames) - 1, int(hp.grid_frames), dtype=int)]
        ckpt_dir, in_place = tracking.local_artifact_dir(training.CHECKPOINTS)

        for epoch in range(start_epoch, int(hp.epochs)):
            train.set_epoch(epoch)
            model.train()
            sums, frames, t0 = np.zeros(3), 0, time.perf_counter()
            batches = progress_bar(
                loader, desc=f"train_vae {epoch + 1}/{hp.epochs}", unit="batch", leave=False
            )
            with training.reading(dataset, damaged):
                for i, batch in enumerate(batches):
                    x = to_input(batch.to(device, non_blocking=True))  # uint8 travels, floats on the device
                    with autocast:
                        recon, mu, logvar = model(x)
                    out = vae_loss(x, recon.float(), mu.float(), logvar.float(), float(hp.kl_tolerance))
                    training.require_finite(out.loss.item(), f"the loss of epoch {epoch}, batch {i}", STAGE)
                    optimizer.zero_grad(set_to_none=True)
                    out.loss.backward()
                    optimizer.step()
                    sums += np.array([out.loss.item(), out.recon.item(), out.kl.item()]) * len(x)
                    frames += len(x)
            elapsed = time.perf_counter() - t0
            val = evaluate(model, val_frames, device, float(hp.kl_tolerance), int(hp.batch_size))
            train_m = sums / max(frames, 1)
            metrics = {
                "train/loss": train_m[0],
                "train/recon": train_m[1],
                "train/kl": train_m[2],
                "val/loss": val[0],
                "val/recon": val[1],
                "val/kl": val[2],
                "train/frames_per_s": frames / elapsed,
            }
            training.require_finite(val[0], f"the validation loss of epoch {epoch}", STAGE)
            training.log_epoch(metrics, epoch)
            # An image series: the run page shows it with a step slider over the epochs.
            grid_image = reconstruction_grid(model, grid, device)
            mlflow.log_image(grid_image, key="reconstructions", step=epoch, synchronous=True)
            best = training.checkpoint_epoch(ckpt_dir, in_place, model, optimizer, epoch, float(val[0]), best)
            log.info(
                "train_vae epoch %d: train %.1f, val %.1f (recon %.1f, kl %.1f), %.0f frames/s",
                epoch,
                train_m[0],
                val[0],
                val[1],
                val[2],
                metrics["train/frames_per_s"],
            )

        training.log_epoch({"best_val_loss": best}, int(hp.epochs) - 1)
        vae = load_module(VAE, ckpt_dir / "best.pt")
        training.log_model(vae, (torch.zeros(2, 3, vae.image_size, vae.image_size),))
        return run.info.run_id


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
def evaluate(
    model: VAE, frames: np.ndarray, device: torch.device, kl_tolerance: float, batch_size: int
) -> np.ndarray:
    """Mean loss, reconstruction error and KL over `frames`, with a fixed noise seed."""
    model.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    sums = np.zeros(3)
    for i in range(0, len(frames), batch_size):
        x = to_input(torch.from_numpy(frames[i : i + batch_size]).to(device))
        out = vae_loss(x, *model(x), kl_tolerance)
        sums += np.array([out.loss.item(), out.recon.item(), out.kl.item()]) * len(x)
    torch.set_rng_state(generator_state)
    return sums / len(frames)


@torch.no_grad()
def reconstruction_grid(model: VAE, frames: np.ndarray, device: torch.device):
    """Validation frames (top row) over their reconstructions from the mean latent (bottom row)."""
    model.eval()
    mu, _ = model.encode(to_input(torch.from_numpy(frames).to(device)))
    recon = to_frames(model.decode(mu))
    return mosaic([*frames, *recon], columns=len(frames))
