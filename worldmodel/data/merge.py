"""Stream verified rollout files into one dataset, one episode at a time.

Per-step datasets are copied chunk by chunk without decompressing when source and target share chunk
shape and filters (the common case: both written by worldmodel); the sources were verified first
(`rollouts.verify`), so only good chunks are copied, with their checksums.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from worldmodel.data import rollouts
from worldmodel.data.rollouts import RolloutInfo
from worldmodel.files import atomic


def make_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/validation split by episode (at least one validation episode when asked for)."""
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _same_layout(src: h5py.Dataset, dst: h5py.Dataset) -> bool:
    return (
        src.chunks == dst.chunks
        and src.compression == dst.compression
        and src.compression_opts == dst.compression_opts
        and src.shuffle == dst.shuffle
        and src.fletcher32 == dst.fletcher32
    )


def _copy_episode(src: h5py.Dataset, s: int, dst: h5py.Dataset, d: int, raw: bool) -> None:
    """Episode s of `src` into slot d of `dst`: compressed chunks as they are when the layouts match,
    else decoded and re-encoded one chunk's worth of steps at a time."""
    steps, chunk = src.shape[1], dst.chunks[1]
    rest = (0,) * (src.ndim - 2)
    for t in range(0, steps, chunk):
        if raw:
            mask, data = src.id.read_direct_chunk((s, t, *rest))
            dst.id.write_direct_chunk((d, t, *rest), data, mask)
        else:
            dst[d, t : t + chunk] = src[s, t : t + chunk]


def _copy_episodes(
    f: h5py.File, infos: list[RolloutInfo], source_runs: list[str], progress: Callable[[int], None]
) -> list[str]:
    """Every episode of `infos`, in order, and the run each came from (`source`: an index into the
    returned runs)."""
    source = f.create_dataset("source", (len(f["lengths"]),), np.int32)  # index into attrs["source_runs"]
    runs = list(dict.fromkeys(source_runs))
    d = 0
    for info, run_id in zip(infos, source_runs):
        with h5py.File(info.path, "r") as src:
            raw = {name: _same_layout(src[name], f[name]) for name in rollouts.PER_STEP}
            for s in range(info.episodes):
                for name in rollouts.PER_STEP:
                    _copy_episode(src[name], s, f[name], d + s, raw[name])
                progress(1)
            for name in ("lengths", "episode"):
                f[name][d : d + info.episodes] = src[name][:]
            source[d : d + info.episodes] = runs.index(run_id)
            d += info.episodes
    return runs


def merge_files(
    infos: list[RolloutInfo],
    source_runs: list[str],
    out: Path,
    val_fraction: float,
    seed: int,
    chunk_frames: int,
    compression_level: int,
    progress: Callable[[int], None] = lambda n: None,
) -> dict[str, float]:
    """Write `out` from the verified files `infos` (in order); returns episodes, frames and sizes.

    The file appears under its final name only once complete; on any error the partial file is removed.
    """
    first = infos[0]
    total = sum(i.episodes for i in infos)
    attrs = {k: first.attrs[k] for k in (*rollouts.SETTINGS, "policy", "seed") if k in first.attrs}
    with atomic(out) as partial:
        f = rollouts.create(
            partial,
            total,
            first.steps,
            first.image_size,
            first.action_dim,
            attrs,
            chunk_frames=chunk_frames,
            compression_level=compression_level,
        )
        try:
            runs = _copy_episodes(f, infos, source_runs, progress)
            train, val = make_split(total, val_fraction, seed)
            f.create_dataset("split/train", data=train.astype(np.int64))
            f.create_dataset("split/val", data=val.astype(np.int64))
            f.attrs["source_runs"] = runs
            f.attrs["val_fraction"] = val_fraction
            f.flush()
        finally:
            f.close()
    raw_bytes = total * first.steps * (first.image_size**2 * 3 + 4 * first.action_dim + 4 + 1)
    size = os.path.getsize(out)
    return {
        "episodes": float(total),
        "frames": float(total * first.steps),
        "bytes": float(size),
        "raw_bytes": float(raw_bytes),
        "compression_ratio": raw_bytes / size,
    }
