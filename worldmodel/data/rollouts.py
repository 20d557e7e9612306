"""The rollouts HDF5 format, shared by collect shards and the merged dataset.

    images   uint8   (E, T, H, W, 3)   chunked (1, chunk_frames, H, W, 3), gzip, fletcher32
    actions  float32 (E, T, A)
    rewards  float32 (E, T)
    dones    bool    (E, T)   the world ended the episode (terminated); the env's time limit is not a done
    lengths  int32   (E,)     valid steps; T unless collected with reset_on_done=false
    episode  int64   (E,)     the episode's index in its collect run (its seed is (seed, episode))

Every dataset carries HDF5 `fletcher32` checksums, so any reader detects a damaged chunk; `verify`
decompresses every chunk (files written before the checksums are caught by gzip's own check).

Attributes: schema, schema_version, env_id, image_size, crop ("top,bottom,left,right"), max_steps,
reset_on_done, policy, seed, run_id. The merged file adds `source_runs` (one per episode, by `source`) and the
train/validation split as datasets `split/train`, `split/val` (episode indices).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from worldmodel.errors import WorldModelError

SCHEMA = "worldmodel.rollouts"
SCHEMA_VERSION = 1
# Attributes that must agree between files that are merged together.
SETTINGS = ("env_id", "image_size", "crop", "max_steps", "reset_on_done")


CHUNK_FRAMES, LEVEL = 25, 1  # images: frames per chunk and gzip level of collect's shards


@dataclass
class Episode:
    images: np.ndarray | None  # uint8 (T, H, W, 3); None once `pack`ed
    actions: np.ndarray  # float32 (T, A)
    rewards: np.ndarray  # float32 (T,)
    dones: np.ndarray  # bool (T,)
    length: int
    index: int
    # `pack`: the images as the file stores them, HDF5 chunks already compressed and checksummed
    image_chunks: list[bytes] | None = None
    image_shape: tuple[int, ...] = ()
    chunk_frames: int = 0

    @property
    def episode_return(self) -> float:
        return float(self.rewards[: self.length].sum())

    def frame(self, t: int) -> np.ndarray:
        if self.images is not None:
            return self.images[t]
        # A chunk is the deflate stream of its frames followed by the 4-byte fletcher32 checksum.
        raw = zlib.decompress(self.image_chunks[t // self.chunk_frames][:-4])
        return np.frombuffer(raw, np.uint8).reshape(-1, *self.image_shape[1:])[t % self.chunk_frames]


def _image_layout(steps: int, image_size: int, chunk_frames: int, level: int) -> dict[str, Any]:
    chunk = max(1, min(chunk_frames, steps))
    return {
        "chunks": (1, chunk, image_size, image_size, 3),
        "compression": "gzip",
        "compression_opts": level,
        "fletcher32": True,
    }


def pack(ep: Episode, chunk_frames: int = CHUNK_FRAMES, level: int = LEVEL) -> Episode:
    """The episode with its images compressed into the chunks a shard stores, by HDF5 itself (in
    memory), so that a collect worker pays for the compression and the writer only copies bytes: at
    16 workers, compressing every frame in the one writing process held collect back."""
    steps, size = ep.images.shape[0], ep.images.shape[1]
    layout = _image_layout(steps, size, chunk_frames, level)
    with h5py.File(f"pack-{os.getpid()}-{ep.index}", "w", driver="core", backing_store=False) as f:
        images = f.create_dataset("images", (1, *ep.images.shape), np.uint8, **layout)
        images[0] = ep.images
        chunk = layout["chunks"][1]
        chunks = [images.id.read_direct_chunk((0, t, 0, 0, 0))[1] for t in range(0, steps, chunk)]
    return replace(ep, images=None, image_chunks=chunks, image_shape=ep.images.shape, chunk_frames=chunk)


def create(
    path: Path,
    episodes: int,
    steps: int,
    image_size: int,
    action_dim: int,
    attrs: dict[str, Any],
    chunk_frames: int = CHUNK_FRAMES,
    compression_level: int = LEVEL,
) -> h5py.File:
    """A new rollouts file with `episodes` empty slots."""
    f = h5py.File(path, "w")
    gzip = {"compression": "gzip", "compression_opts": compression_level, "fletcher32": True}
    layout = _image_layout(steps, image_size, chunk_frames, compression_level)
    f.create_dataset("images", (episodes, steps, image_size, image_size, 3), np.uint8, **layout)
    f.create_dataset(
        "actions", (episodes, steps, action_dim), np.float32, chunks=(1, steps, action_dim), **gzip
    )
    f.create_dataset("rewards", (episodes, steps), np.float32, chunks=(1, steps), **gzip)
    f.create_dataset("dones", (episodes, steps), bool, chunks=(1, steps), **gzip)
    f.create_dataset("lengths", (episodes,), np.int32, chunks=True, fletcher32=True)
    f.create_dataset("episode", (episodes,), np.int64, chunks=True, fletcher32=True)
    f.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **attrs})
    return f


def write_episode(f: h5py.File, slot: int, ep: Episode) -> None:
    if ep.image_chunks is None:
        f["images"][slot] = ep.images
    else:  # packed by the worker with this file's layout: the chunks go in as they are
        images = f["images"]
        if images.chunks[1] != ep.chunk_frames or images.shape[1:] != ep.image_shape:
            raise ValueError(f"episode packed as {ep.chunk_frames}-frame chunks of {ep.image_shape}")
        for i, chunk in enumerate(ep.image_chunks):
            images.id.write_direct_chunk((slot, i * ep.chunk_frames, 0, 0, 0), chunk)
    f["actions"][slot] = ep.actions
    f["rewards"][slot] = ep.rewards
    f["dones"][slot] = ep.dones
    f["lengths"][slot] = ep.length
    f["episode"][slot] = ep.index


def finish(f: h5py.File, partial: Path, final: Path) -> None:
    """Close a file written under a temporary name and move it into place atomically."""
    f.flush()
    f.close()
    os.replace(partial, final)


MAX_CHUNK_BYTES = 64 * 2**20  # one chunk is what a reader holds at a time


def check_stored(path: Path, dataset: h5py.Dataset) -> None:
    """The shape a dataset declares is backed by data the file holds (every chunk stored, each of a
    bounded size; contiguous bytes within the file), so a crafted header that declares 10⁹ episodes
    fails here, before any reader allocates for it or loops over it."""
    name, shape, itemsize = dataset.name.lstrip("/"), dataset.shape, dataset.dtype.itemsize
    if dataset.chunks is None:
        stored, wanted = dataset.id.get_storage_size(), math.prod(shape) * itemsize
        ok = stored == wanted and stored <= os.path.getsize(path)
        what = f"{stored} of its {wanted} bytes"
    else:
        if math.prod(dataset.chunks) * itemsize > MAX_CHUNK_BYTES:
            raise WorldModelError(
                f"{path}: dataset '{name}' declares chunks of {dataset.chunks}, over "
                f"{MAX_CHUNK_BYTES >> 20} MB each; not a file worldmodel wrote: remove it"
            )
        wanted = math.prod(-(-s // c) for s, c in zip(shape, dataset.chunks))
        stored = dataset.id.get_num_chunks()
        ok, what = stored == wanted, f"{stored} of its {wanted} chunks"
    if not ok:
        raise WorldModelError(
            f"{path}: dataset '{name}' declares shape {shape} but the file holds {what}; "
            "it is truncated or crafted: remove it and re-run the stage that made it"
        )


@dataclass
class RolloutInfo:
    path: Path
    episodes: int
    steps: int
    image_size: int
    action_dim: int
    attrs: dict[str, Any]


def _attr(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


PER_STEP = ("images", "actions", "rewards", "dones")  # the (E, T, ...) datasets, chunked within an episode
DTYPES = {
    "images": np.uint8,
    "actions": np.float32,
    "rewards": np.float32,
    "dones": np.bool_,
    "lengths": np.int32,
    "episode": np.int64,
}
SPLITS = ("split/train", "split/val")  # a merged dataset's episode indices


def inspect(path: Path, merged: bool = False) -> RolloutInfo:
    """Open a rollouts file and check its schema, dtypes and shapes (and, for a `merged` dataset, its
    train/validation split); a one-line error otherwise."""
    try:
        with h5py.File(path, "r") as f:
            _check_schema(f, path)
            e, t, size, a = _check_datasets(f, path, merged)
            # Touch the last chunk of every dataset: a truncated file fails here, not halfway through a copy.
            for name in PER_STEP:
                if e:
                    f[name][e - 1, t - 1]
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
            return RolloutInfo(Path(path), e, t, size, a, attrs)
    except WorldModelError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise WorldModelError(
            f"{path}: unreadable HDF5 file ({str(err).splitlines()[0]}); "
            "it is corrupt or truncated: delete it and re-run the stage that made it"
        ) from err


def _check_schema(f: h5py.File, path: Path) -> None:
    if f.attrs.get("schema") != SCHEMA:
        raise WorldModelError(
            f"{path}: not a worldmodel rollouts file (schema attribute "
            f"{f.attrs.get('schema')!r}); remove it or point at another run"
        )
    if int(f.attrs.get("schema_version", -1)) != SCHEMA_VERSION:
        raise WorldModelError(
            f"{path}: rollouts schema version {f.attrs.get('schema_version')}, "
            f"this worldmodel reads {SCHEMA_VERSION}; re-collect it"
        )


def _check_datasets(f: h5py.File, path: Path, merged: bool) -> tuple[int, int, int, int]:
    """Every dataset present, of its dtype and shape, and stored whole. Returns the episodes, steps,
    image size and action size."""
    for name, dtype in DTYPES.items():
        if name not in f:
            raise WorldModelError(
                f"{path}: dataset '{name}' is missing; the file is not a complete rollouts file; "
                "re-collect it"
            )
        if f[name].dtype != dtype:
            raise WorldModelError(
                f"{path}: dataset '{name}' has dtype {f[name].dtype}, expected {np.dtype(dtype)}"
            )
    e, t, h, w, c = f["images"].shape
    size = int(f.attrs.get("image_size", -1))
    if (h, w, c) != (size, size, 3):
        raise WorldModelError(f"{path}: images are {h}×{w}×{c}, attribute image_size says {size}")
    a = f["actions"].shape[-1]
    shapes = {"actions": (e, t, a), "rewards": (e, t), "dones": (e, t), "lengths": (e,), "episode": (e,)}
    for name, shape in shapes.items():
        if f[name].shape != shape:
            raise WorldModelError(f"{path}: dataset '{name}' has shape {f[name].shape}, expected {shape}")
    for name in SPLITS if merged else ():
        if name not in f:
            raise WorldModelError(f"{path}: dataset '{name}' is missing; it is not a merged dataset")
    for name in (*DTYPES, *(SPLITS if merged else ())):
        check_stored(Path(path), f[name])
    return e, t, size, a


def verify(path: Path, hint: str, progress: Callable[[int], None] = lambda n: None) -> None:
    """Read every chunk of every dataset (checksums and decompression checked), one episode at a time;
    a one-line error naming the file, the dataset and the episode, ending in `hint` (what to do)."""
    try:
        with h5py.File(path, "r") as f:
            for name in ("lengths", "episode"):
                where = f"dataset '{name}'"
                f[name][:]
            for e in range(f["images"].shape[0]):
                for name in PER_STEP:
                    where = f"dataset '{name}', episode {e}"
                    f[name][e]
                progress(1)
    except OSError as err:
        raise WorldModelError(
            f"{path}: damaged data in {where} ({str(err).splitlines()[0]}); {hint}"
        ) from err


def check_same_settings(infos: list[RolloutInfo]) -> None:
    """Every file to be merged was collected with the same env, frames and episode length."""
    first = infos[0]
    for info in infos[1:]:
        if (info.steps, info.image_size, info.action_dim) != (
            first.steps,
            first.image_size,
            first.action_dim,
        ):
            raise WorldModelError(
                f"{info.path}: {info.steps} steps of {info.image_size}px frames and {info.action_dim}-d "
                f"actions, but {first.path} has {first.steps} steps, {first.image_size}px, "
                f"{first.action_dim}-d; merge only runs collected with the same settings"
            )
        for key in SETTINGS:
            if info.attrs.get(key) != first.attrs.get(key):
                raise WorldModelError(
                    f"{info.path}: {key}={info.attrs.get(key)} but {first.path} has "
                    f"{key}={first.attrs.get(key)}; merge only runs with the same settings"
                )
