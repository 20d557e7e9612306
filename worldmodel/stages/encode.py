"""encode: every frame of a dataset to the VAE's `mu` and `logvar`, in large batches.

Input: a train_vae run (default: the latest compatible) and its dataset (default: the one that VAE
was trained on; `inputs.merge` picks another, which must have the VAE's frame size).
"""

from __future__ import annotations

import logging
import time

import h5py
import mlflow
import numpy as np
import torch
from omegaconf import DictConfig

from worldmodel import files, tracking, training
from worldmodel.config import settings
from worldmodel.config.sections import Encode
from worldmodel.control.agent import load_vae
from worldmodel.data import latents
from worldmodel.errors import WorldModelError
from worldmodel.models.vae import VAE, to_input
from worldmodel.progress import progress_bar
from worldmodel.stages.merge import dataset_of
from worldmodel.tracking import lineage

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    settings(cfg, Encode)


def run(cfg: DictConfig) -> str:
    compat = tracking.compat(cfg, "image_size", "latent_size")
    vae_run = tracking.resolve_run(cfg, "train_vae", cfg.inputs.train_vae, compat)
    merge_id = cfg.inputs.merge or tracking.upstream_run(vae_run, "merge").info.run_id
    merge_run = tracking.resolve_run(cfg, "merge", merge_id, {})
    dataset, info = dataset_of(merge_run.info.run_id)
    device = training.pick_device(cfg)
    vae = _checked_vae(cfg, vae_run.info.run_id, merge_run.info.run_id, info.image_size, device)
    upstream = {"train_vae": vae_run.info.run_id, "merge": merge_run.info.run_id}
    with tracking.stage_run(cfg, "encode", ["encode", "latent"], upstream, compat) as run:
        tracking.log_dataset(merge_run.info.run_id, lineage.DATASET, "encode")
        out = tracking.OutputDir()
        attrs = {
            "latent_size": vae.latent,
            "image_size": vae.image_size,
            "env_id": info.attrs["env_id"],
            "vae_run": vae_run.info.run_id,
            "merge_run": merge_run.info.run_id,
            "run_id": run.info.run_id,
        }
        hint = f"the dataset is damaged: run merge again (merge run {merge_run.info.run_id})"
        t0 = time.perf_counter()
        with files.atomic(out / lineage.LATENTS) as partial:
            f = latents.create(partial, info.episodes, info.steps, vae.latent, info.action_dim, attrs)
            try:
                with training.reading(dataset, hint), h5py.File(dataset, "r") as src:
                    frames = _encode(vae, src, f, settings(cfg, Encode).batch_size, device)
            finally:
                f.close()
        out.publish(out / lineage.LATENTS)
        elapsed = time.perf_counter() - t0
        mlflow.log_metrics({"frames": float(frames), "frames_per_s": frames / elapsed})
        log.info("encode: %d frames at %.0f frames/s → run %s", frames, frames / elapsed, run.info.run_id)
        return run.info.run_id


def _checked_vae(cfg: DictConfig, vae_id: str, merge_id: str, image_size: int, device: torch.device) -> VAE:
    vae = load_vae(tracking.checkpoint_path(vae_id)).to(device)
    if image_size != vae.image_size:
        raise WorldModelError(
            f"dataset of merge run {merge_id} has {image_size}px frames but "
            f"VAE run {vae_id} takes {vae.image_size}px; encode a matching dataset"
        )
    if vae.latent != cfg.latent.size:
        raise WorldModelError(
            f"latent.size={cfg.latent.size} but VAE run {vae_id} has {vae.latent} latents; "
            f"use latent=z{vae.latent}"
        )
    return vae


@torch.inference_mode()
def _encode(vae: VAE, src: h5py.File, out: h5py.File, batch: int, device: torch.device) -> int:
    """Copy the per-episode datasets, and encode every episode's frames. Returns the frames encoded."""
    for name in ("actions", "rewards", "dones", "lengths", "split/train", "split/val"):
        if name in out:
            out[name][:] = src[name][:]
        else:
            out.create_dataset(name, data=src[name][:])
    episodes, steps = src["images"].shape[:2]
    for e in progress_bar(range(episodes), desc="encode", unit="ep"):
        images = src["images"][e]
        mu, logvar = np.empty((2, steps, vae.latent), np.float32)
        for i in range(0, steps, batch):
            m, lv = vae.encode(to_input(torch.from_numpy(images[i : i + batch]).to(device)))
            mu[i : i + batch], logvar[i : i + batch] = m.cpu().numpy(), lv.cpu().numpy()
        out["mu"][e], out["logvar"][e] = mu, logvar
    return episodes * steps
