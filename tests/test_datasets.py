import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

from worldmodel.data.datasets import ShuffledFrameBatches


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
