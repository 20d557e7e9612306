"""Reading a merged rollouts file (or a latents file, which shares its layout) for training: its
splits, and the shuffled frame batches train_vae learns from.

The HDF5 file is opened lazily, once per process, so the datasets are safe with
`DataLoader(num_workers>0)`: a handle is never pickled into a worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info


def episodes_in(path: Path, split: str) -> np.ndarray:
    """Episode indices of `split` ("train", "val" or "all") in a dataset or latents file."""
    with h5py.File(path, "r") as f:
        if split == "all":
            return np.arange(f["lengths"].shape[0])
        return f[f"split/{split}"][:]


class _LazyFile:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._file: h5py.File | None = None

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}


class ShuffledFrameBatches(_LazyFile, IterableDataset):
    """Batches of uint8 frames (B, H, W, 3) for training: whole HDF5 chunks are read (one
    decompression per chunk, not per frame) into a buffer that is shuffled before batches are cut.

    Deterministic for a given seed and epoch (`set_epoch`); with several loader workers each takes
    its own share of the chunks.
    """

    def __init__(
        self,
        path: Path | str,
        batch_size: int,
        split: str = "train",
        buffer_frames: int = 4096,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__(path)
        self.batch_size, self.buffer_frames, self.seed, self.drop_last = (
            batch_size,
            buffer_frames,
            seed,
            drop_last,
        )
        self.epoch = 0
        episodes = episodes_in(Path(path), split)
        with h5py.File(path, "r") as f:
            lengths = f["lengths"][:]
            chunk = f["images"].chunks[1]
        self.blocks = [
            (e, t, min(t + chunk, lengths[e])) for e in episodes for t in range(0, lengths[e], chunk)
        ]
        self.frames = sum(b - a for _, a, b in self.blocks)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.frames // self.batch_size if self.drop_last else -(-self.frames // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.blocks))
        info = get_worker_info()
        if info is not None:
            order = order[info.id :: info.num_workers]
            rng = np.random.default_rng([self.seed, self.epoch, info.id])
        images = self.file["images"]
        buffer: list[np.ndarray] = []
        held = 0
        for i in order:
            e, a, b = self.blocks[i]
            buffer.append(images[e, a:b])
            held += b - a
            if held >= self.buffer_frames:
                yield from self._cut(np.concatenate(buffer), rng, keep_rest=True, out=buffer)
                held = sum(len(x) for x in buffer)
        if buffer:
            yield from self._cut(np.concatenate(buffer), rng, keep_rest=False, out=buffer)

    def _cut(
        self, frames: np.ndarray, rng: np.random.Generator, keep_rest: bool, out: list[np.ndarray]
    ) -> Iterator[torch.Tensor]:
        frames = frames[rng.permutation(len(frames))]
        n_full = len(frames) // self.batch_size
        out.clear()
        for k in range(n_full):
            yield torch.from_numpy(frames[k * self.batch_size : (k + 1) * self.batch_size])
        rest = frames[n_full * self.batch_size :]
        if len(rest):
            if keep_rest:
                out.append(rest)
            elif not self.drop_last:
                yield torch.from_numpy(rest)
