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

from worldmodel import tracking, training
from worldmodel.agent import load_vae
from worldmodel.config import positive_int
from worldmodel.data import latents
from worldmodel.errors import WorldModelError
from worldmodel.files import partial_of
from worldmodel.models.vae import to_input
from worldmodel.progress import progress_bar
from worldmodel.stages.merge import dataset_of

log = logging.getLogger(__name__)
LATENTS = "latents.h5"


def validate(cfg: DictConfig) -> None:
    positive_int(cfg, "encode.batch_size")


def run(cfg: DictConfig) -> str:
    compat = {"image_size": str(cfg.env.image_size), "latent_size": str(cfg.latent.size)}
    vae_run = tracking.resolve_run(cfg, "train_vae", cfg.inputs.train_vae, compat)
    merge_id = cfg.inputs.merge or vae_run.data.tags["upstream.merge"]
    merge_run = tracking.resolve_run(cfg, "merge", merge_id, {})
    dataset, info = dataset_of(merge_run.info.run_id)
    device = training.pick_device(cfg)
    vae = load_vae(training.checkpoint_path(vae_run.info.run_id)).to(device)
    if info.image_size != vae.image_size:
        raise WorldModelError(
            f"dataset of merge run {merge_run.info.run_id} has {info.image_size}px frames but "
            f"VAE run {vae_run.info.run_id} takes {vae.image_size}px; encode a matching dataset"
        )
    if vae.latent != cfg.latent.size:
        raise WorldModelError(
            f"latent.size={cfg.latent.size} but VAE run {vae_run.info.run_id} has "
            f"{vae.latent} latents; use latent=z{vae.latent}"
        )

    upstream = {"train_vae": vae_run.info.run_id, "merge": merge_run.info.run_id}
    with tracking.stage_run(cfg, "encode", ["encode", "latent"], upstream, compat) as run:
        tracking.log_dataset(merge_run.info.run_id, "dataset.h5", "encode")
        out_dir, in_place = tracking.local_artifact_dir("")
        final = out_dir / LATENTS
        partial = partial_of(final)
        attrs = {
            "latent_size": vae.latent,
            "image_size": vae.image_size,
            "env_id": info.attrs["env_id"],
            "vae_run": vae_run.info.run_id,
            "merge_run": merge_run.info.run_id,
            "run_id": run.info.run_id,
        }
        out = latents.create(partial, info.episodes, info.steps, vae.latent, info.action_dim, attrs)
        batch = int(cfg.encode.batch_size)
        t0, frames = time.perf_counter(), 0
        try:
            damaged = f"the dataset is damaged: run merge again (merge run {merge_run.info.run_id})"
            with training.reading(dataset, damaged), h5py.File(dataset, "r") as src, torch.inference_mode():
                for name in ("actions", "rewards", "dones", "lengths", "split/train", "split/val"):
                    if name in out:
                        out[name][:] = src[name][:]
                    else:
                        out.create_dataset(name, data=src[name][:])
                for e in progress_bar(range(info.episodes), desc="encode", unit="ep"):
                    images = src["images"][e]
                    mu, logvar = np.empty((2, info.steps, vae.latent), np.float32)
                    for i in range(0, info.steps, batch):
                        m, lv = vae.encode(to_input(torch.from_numpy(images[i : i + batch]).to(device)))
                        mu[i : i + batch], logvar[i : i + batch] = m.cpu().numpy(), lv.cpu().numpy()
                    out["mu"][e], out["logvar"][e] = mu, logvar
                    frames += info.steps
            out.close()
            partial.replace(final)
        except BaseException:
            out.close()
            partial.unlink(missing_ok=True)
            raise
        tracking.publish(final, "", in_place)
        elapsed = time.perf_counter() - t0
        mlflow.log_metrics({"frames": float(frames), "frames_per_s": frames / elapsed})
        log.info("encode: %d frames at %.0f frames/s → run %s", frames, frames / elapsed, run.info.run_id)
        return run.info.run_id
