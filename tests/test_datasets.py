import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

from worldmodel.data.datasets import FrameDataset, SequenceDataset, ShuffledFrameBatches


def test_frame_dataset_shapes_and_loader_workers(dataset_path):
    ds = FrameDataset(dataset_path, "train")
    assert len(ds) == 3 * 40
    x = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    batches = list(DataLoader(ds, batch_size=16, num_workers=2))
    assert sum(len(b) for b in batches) == len(ds)
    assert len(FrameDataset(dataset_path, "val")) == 40


def test_sequence_dataset_windows(dataset_path):
    ds = SequenceDataset(dataset_path, seq_len=16, split="all")
    assert len(ds) == 4 * 2
    item = ds[1]
    assert item["images"].shape == (16, 64, 64, 3) and item["actions"].shape == (16, 3)
    with h5py.File(dataset_path, "r") as f:
        np.testing.assert_array_equal(item["rewards"].numpy(), f["rewards"][0, 16:32])
    loaded = next(iter(DataLoader(ds, batch_size=4, num_workers=2)))
    assert loaded["dones"].shape == (4, 16) and loaded["dones"].dtype == torch.bool


def test_shuffled_batches_cover_every_training_frame_once(dataset_path):
    ds = ShuffledFrameBatches(
        dataset_path, batch_size=8, split="train", buffer_frames=30, seed=1, drop_last=False
    )
    batches = list(ds)
    frames = torch.cat(batches)
    assert frames.shape == (120, 64, 64, 3) and frames.dtype == torch.uint8
    with h5py.File(dataset_path, "r") as f:
        train = f["split/train"][:]
        expected = np.concatenate([f["images"][e] for e in train])
    key = lambda a: sorted(bytes(x) for x in a)  # noqa: E731
    assert key(frames.numpy()) == key(expected)
    ds.set_epoch(1)
    assert not torch.equal(torch.cat(list(ds)), frames), "a new order each epoch"
    ds.set_epoch(0)
    assert torch.equal(torch.cat(list(ds)), frames), "the same order for the same seed and epoch"
    two = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert sum(len(b) for b in two) == 120
