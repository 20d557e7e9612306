"""The latents HDF5 format written by encode and read by train_rnn, evolve and dream.

    mu, logvar  float32 (E, T, Z)
    actions     float32 (E, T, A)     rewards float32 (E, T)     dones bool (E, T)
    lengths     int32   (E,)          split/train, split/val     (episode indices, as in the dataset)

Attributes: schema, schema_version, latent_size, image_size, env_id, vae_run, merge_run, run_id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from worldmodel.data.rollouts import check_stored
from worldmodel.errors import WorldModelError

SCHEMA = "worldmodel.latents"
SCHEMA_VERSION = 1
PER_STEP = ("mu", "logvar", "actions", "rewards", "dones")  # the (E, T, ...) datasets
DATASETS = (*PER_STEP, "lengths", "split/train", "split/val")


def create(
    path: Path, episodes: int, steps: int, latent: int, action_dim: int, attrs: dict[str, Any]
) -> h5py.File:
    f = h5py.File(path, "w")
    gzip = {"compression": "gzip", "compression_opts": 1, "fletcher32": True}
    for name in ("mu", "logvar"):
        f.create_dataset(name, (episodes, steps, latent), np.float32, chunks=(1, steps, latent), **gzip)
    f.create_dataset(
        "actions", (episodes, steps, action_dim), np.float32, chunks=(1, steps, action_dim), **gzip
    )
    f.create_dataset("rewards", (episodes, steps), np.float32, chunks=(1, steps), **gzip)
    f.create_dataset("dones", (episodes, steps), bool, chunks=(1, steps), **gzip)
    f.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **attrs})
    return f


@dataclass
class LatentsInfo:
    path: Path
    episodes: int
    steps: int
    latent: int
    action_dim: int
    lengths: np.ndarray  # int32 (E,)


def inspect(path: Path, latent_size: int | None = None) -> LatentsInfo:
    """Check a latents file's schema, datasets, dtypes, shapes and (when given) latent size; one line
    naming the problem otherwise. Reads only the lengths."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema") != SCHEMA or int(f.attrs.get("schema_version", -1)) != SCHEMA_VERSION:
                raise WorldModelError(
                    f"{path}: not a worldmodel latents file (version {SCHEMA_VERSION}); re-run encode"
                )
            for name in DATASETS:
                if name not in f:
                    raise WorldModelError(f"{path}: dataset '{name}' is missing; re-run encode")
            e, t, z = f["mu"].shape
            a = f["actions"].shape[-1]
            shapes = {"logvar": (e, t, z), "actions": (e, t, a), "rewards": (e, t), "dones": (e, t)}
            for name, shape in {**shapes, "lengths": (e,)}.items():
                if f[name].shape != shape:
                    raise WorldModelError(
                        f"{path}: dataset '{name}' has shape {f[name].shape}, expected {shape}"
                    )
            for name in DATASETS:
                check_stored(Path(path), f[name])
            if latent_size is not None and z != latent_size:
                raise WorldModelError(
                    f"{path} holds {z}-d latents but latent.size={latent_size}; "
                    f"use latent=z{z} or encode with a {latent_size}-d VAE"
                )
            return LatentsInfo(Path(path), e, t, z, a, f["lengths"][:])
    except WorldModelError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise WorldModelError(
            f"{path}: unreadable latents file ({str(err).splitlines()[0]}); re-run encode"
        ) from err


def check_finite(path: Path, name: str, values: np.ndarray, episodes: np.ndarray) -> None:
    """A NaN or inf in an input would train M to NaN or score a controller NaN: one line naming the
    file, the dataset and the first bad index (the episode as stored in the file)."""
    bad = ~np.isfinite(values)
    if bad.any():
        where = np.argwhere(bad)[0]
        index = (int(episodes[where[0]]), *map(int, where[1:]))
        raise WorldModelError(
            f"{path}: dataset '{name}' holds {values[tuple(where)]} at index {list(index)}; "
            "the file is damaged or was encoded from bad frames: re-run encode"
        )


def _read(f: h5py.File, episodes: np.ndarray) -> dict[str, np.ndarray]:
    order = np.argsort(episodes, kind="stable")  # HDF5 reads a sorted selection; put it back in order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    wanted = np.asarray(episodes)[order]
    out = {k: f[k][wanted][rank] for k in (*PER_STEP, "lengths")}
    for name in ("mu", "logvar", "actions", "rewards"):
        check_finite(Path(f.filename), name, out[name], np.asarray(episodes))
    return out


def stream(path: Path, episodes: np.ndarray, per_read: int) -> Iterator[dict[str, np.ndarray]]:
    """The arrays of `episodes`, in that order, `per_read` episodes at a time: memory is bounded by
    `per_read`, never by the size of the file."""
    try:
        with h5py.File(path, "r") as f:
            for i in range(0, len(episodes), per_read):
                yield _read(f, np.asarray(episodes[i : i + per_read]))
    except OSError as err:
        raise WorldModelError(
            f"{path}: damaged latents file ({str(err).splitlines()[0]}); re-run encode"
        ) from err


def read(path: Path, episodes: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of `episodes` (a few; see `stream` for many)."""
    return next(stream(path, episodes, max(1, len(episodes))))


def first_steps(path: Path, episodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu and logvar of step 0 of `episodes`: (E, Z) each, where dreams start."""
    mu, logvar = [], []
    with h5py.File(path, "r") as f:
        for e in episodes:  # one chunk per episode is decompressed, then dropped
            mu.append(f["mu"][e, 0])
            logvar.append(f["logvar"][e, 0])
    mu, logvar = np.stack(mu), np.stack(logvar)
    for name, values in (("mu", mu), ("logvar", logvar)):
        check_finite(Path(path), name, values[:, None], np.asarray(episodes))
    return mu, logvar
