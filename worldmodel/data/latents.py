"""The latents HDF5 format written by encode and read by train_rnn, evolve and dream.

    mu, logvar  float32 (E, T, Z)
    actions     float32 (E, T, A)     rewards float32 (E, T)     dones bool (E, T)
    lengths     int32   (E,)          split/train, split/val     (episode indices, as in the dataset)

Attributes: schema, schema_version, latent_size, image_size, env_id, vae_run, merge_run, run_id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from worldmodel.errors import WorldModelError

SCHEMA = "worldmodel.latents"
SCHEMA_VERSION = 1


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


def load(path: Path, split: str = "all") -> dict[str, np.ndarray]:
    """The arrays of one split, in memory (latents are small: E·T·Z·8 bytes)."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema") != SCHEMA or int(f.attrs.get("schema_version", -1)) != SCHEMA_VERSION:
                raise WorldModelError(
                    f"{path}: not a worldmodel latents file (version {SCHEMA_VERSION}); re-run encode"
                )
            idx = np.arange(f["lengths"].shape[0]) if split == "all" else f[f"split/{split}"][:]
            out = {k: f[k][:][idx] for k in ("mu", "logvar", "actions", "rewards", "dones", "lengths")}
            out["attrs"] = dict(f.attrs)
            return out
    except WorldModelError:
        raise
    except (OSError, KeyError) as err:
        raise WorldModelError(
            f"{path}: unreadable latents file ({str(err).splitlines()[0]}); re-run encode"
        ) from err
