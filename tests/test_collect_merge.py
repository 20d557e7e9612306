"""collect → merge on experiment=smoke, in a temporary MLflow store."""

import shutil

import h5py
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import DATASETS, shard_arrays
from worldmodel import tracking
from worldmodel.errors import WorldModelError
from worldmodel.stages import run_stage


def test_collect_run_is_tracked(smoke, collect_run):
    tracking.setup(smoke())
    run = mlflow.get_run(collect_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "collect" and run.data.tags["env"] == "CarRacing-v3"
    assert run.data.tags["image_size"] == "64" and run.data.tags["mlflow.source.git.commit"]
    assert run.data.params["collect.episodes"] == "4" and run.data.params["policy.name"] == "pseudo_random"
    assert run.data.params["env.image_size"] == "64" and run.data.params["seed"] == "0"
    m = run.data.metrics
    assert m["episodes"] == 4 and m["frames"] == 160 and m["frames_per_s"] > 0
    assert "return_mean" in m and "return_std" in m
    files = {a.path for a in MlflowClient().list_artifacts(collect_run)}
    assert {"shards", "sample_frames.png", "config"} <= files
    assert tracking.list_artifacts(collect_run, "config") == ["config/config.yaml"]
    shards = tracking.list_artifacts(collect_run, "shards")
    assert shards == ["shards/shard_00000.h5", "shards/shard_00001.h5"]


def test_shards_hold_whole_episodes_with_the_schema(collect_run, smoke):
    tracking.setup(smoke())
    arrays = shard_arrays(collect_run)
    assert arrays["images"].shape == (4, 40, 64, 64, 3)
    assert arrays["actions"].shape == (4, 40, 3) and arrays["rewards"].shape == (4, 40)
    for key, dtype in DATASETS.items():
        assert arrays[key].dtype == dtype
    assert list(arrays["episode"]) == [0, 1, 2, 3]
    assert arrays["images"].std() > 10, "real frames, not blanks"
    assert np.any(arrays["rewards"] < 0) and np.any(np.isclose(arrays["rewards"], -0.1))
    with h5py.File(tracking.artifact_path(collect_run, "shards/shard_00000.h5"), "r") as f:
        assert f["images"].compression == "gzip"
        assert f["images"].chunks[1] < 40 or f["images"].chunks[1] == f["images"].shape[1]
        assert f.attrs["run_id"] == collect_run


def test_collect_is_the_same_whatever_the_worker_count(smoke, collect_run):
    one = run_stage(smoke("stage=collect", "collect.workers=1"))
    a, b = shard_arrays(collect_run), shard_arrays(one)
    for key in (*DATASETS, "episode"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    other_seed = run_stage(smoke("stage=collect", "collect.workers=1", "seed=1", "collect.episodes=2"))
    assert not np.array_equal(shard_arrays(other_seed)["images"], a["images"][:2])


def test_resume_keeps_complete_shards_and_collects_the_rest(smoke):
    cfg = smoke("stage=collect", "collect.workers=1")
    run_id = run_stage(cfg)
    first = tracking.artifact_path(run_id, "shards/shard_00000.h5")
    kept_mtime = first.stat().st_mtime_ns
    second = tracking.artifact_path(run_id, "shards/shard_00001.h5")
    before = shard_arrays(run_id)
    second.unlink()  # as if the run had been interrupted during its second shard
    MlflowClient().set_terminated(run_id, "KILLED")

    with pytest.raises(WorldModelError, match="inputs.collect"):
        run_stage(smoke("stage=merge", f"inputs.collect={run_id}"))  # a KILLED run is never an input
    resumed = run_stage(smoke("stage=collect", f"inputs.resume={run_id}"))
    assert resumed == run_id
    assert first.stat().st_mtime_ns == kept_mtime, "complete shards are kept, not redone"
    after = shard_arrays(run_id)
    for key in DATASETS:
        np.testing.assert_array_equal(before[key], after[key])
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    redone = second.stat().st_mtime_ns
    assert run_stage(smoke("stage=collect", f"inputs.resume={run_id}")) == run_id  # complete: nothing to do
    assert second.stat().st_mtime_ns == redone and mlflow.get_run(run_id).info.status == "FINISHED"


def test_merge_run_is_tracked_and_chained(smoke, collect_run, merge_run):
    tracking.setup(smoke())
    run = mlflow.get_run(merge_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "merge" and run.data.tags["upstream.collect"] == collect_run
    assert run.data.params["merge.val_fraction"] == "0.25"
    m = run.data.metrics
    assert m["episodes"] == 4 and m["frames"] == 160 and m["bytes"] > 0 and m["compression_ratio"] > 1
    assert "dataset.h5" in {a.path for a in MlflowClient().list_artifacts(merge_run)}


def test_merged_file_schema_split_and_plain_h5py_indexing(dataset_path, collect_run, smoke):
    tracking.setup(smoke())
    shards = shard_arrays(collect_run)
    with h5py.File(dataset_path, "r") as f:
        for key, dtype in DATASETS.items():
            assert f[key].dtype == dtype
            np.testing.assert_array_equal(f[key][:], shards[key])
        assert f["images"].shape == (4, 40, 64, 64, 3)
        frame = f["images"][2, 7]
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
        np.testing.assert_array_equal(frame, shards["images"][2, 7])
        train, val = f["split/train"][:], f["split/val"][:]
        assert len(val) == 1 and sorted([*train, *val]) == [0, 1, 2, 3]
        assert f.attrs["env_id"] == "CarRacing-v3" and int(f.attrs["image_size"]) == 64
        assert list(f.attrs["source_runs"]) == [collect_run]
        assert f["images"].chunks == (1, 10, 64, 64, 3)


def test_merge_default_input_is_the_latest_compatible_collect(smoke, collect_run):
    run_id = run_stage(smoke("stage=merge"))
    tracking.setup(smoke())
    assert mlflow.get_run(run_id).data.tags["upstream.collect"] != ""


def test_merge_of_two_collect_runs(smoke, collect_run):
    extra = run_stage(smoke("stage=collect", "seed=5", "collect.episodes=2", "collect.workers=1"))
    merged = run_stage(smoke("stage=merge", f"inputs.collect=[{collect_run},{extra}]"))
    with h5py.File(tracking.artifact_path(merged, "dataset.h5"), "r") as f:
        assert f["images"].shape[0] == 6
        assert list(f.attrs["source_runs"]) == [collect_run, extra]
        assert list(f["source"][:]) == [0, 0, 0, 0, 1, 1]


def _corrupt_copy_of(smoke, collect_run, damage):
    """A finished collect run whose second shard has been damaged by `damage(path)`."""
    run_id = run_stage(smoke("stage=collect", "collect.workers=1", "seed=2"))
    damage(tracking.artifact_path(run_id, "shards/shard_00001.h5"))
    return run_id


def _outputs_after(smoke, run_id):
    tracking.setup(smoke())
    before = {p for p in tracking.artifact_path(run_id, "shards").parent.parent.parent.rglob("*")}
    return before


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "corrupt or truncated"),
        (lambda p: p.write_bytes(b"not an hdf5 file at all"), "corrupt or truncated"),
    ],
)
def test_merge_refuses_a_damaged_shard_and_writes_nothing(smoke, collect_run, damage, message):
    bad = _corrupt_copy_of(smoke, collect_run, damage)
    files_before = _outputs_after(smoke, bad)
    with pytest.raises(WorldModelError, match=message) as err:
        run_stage(smoke("stage=merge", f"inputs.collect=[{collect_run},{bad}]"))
    assert "shard_00001.h5" in str(err.value) and "\n" not in str(err.value)
    assert _outputs_after(smoke, bad) == files_before, "nothing written"
    assert tracking.artifact_path(bad, "shards/shard_00000.h5").exists(), "shards are never deleted"


def test_merge_refuses_a_shard_with_another_image_size(smoke, collect_run):
    other = run_stage(smoke("stage=collect", "collect.workers=1", "env.image_size=96", "collect.episodes=2"))
    # Put the 96px shard among the 64px ones, as a user copying files around might.
    run_id = run_stage(smoke("stage=collect", "collect.workers=1", "seed=3"))
    shutil.copyfile(
        tracking.artifact_path(other, "shards/shard_00000.h5"),
        tracking.artifact_path(run_id, "shards/shard_00001.h5"),
    )
    files_before = _outputs_after(smoke, run_id)
    with pytest.raises(WorldModelError, match="96px") as err:
        run_stage(smoke("stage=merge", f"inputs.collect={run_id}"))
    assert "shard_00001.h5" in str(err.value)
    assert _outputs_after(smoke, run_id) == files_before
    with pytest.raises(WorldModelError, match="image_size=96"):
        run_stage(smoke("stage=merge", f"inputs.collect={other}"))  # a 96px run for a 64px config


def test_merge_names_a_missing_upstream_run(smoke):
    with pytest.raises(WorldModelError, match="inputs.collect=0123456789abcdef: no such run"):
        run_stage(smoke("stage=merge", "inputs.collect=0123456789abcdef"))


def test_a_packed_episode_writes_the_same_chunks_and_frames(tmp_path):
    from worldmodel.data import rollouts

    rng = np.random.default_rng(0)
    steps = 60  # not a multiple of the chunk: the last chunk is partly padding
    blocks = rng.integers(0, 4, (steps, 16, 16, 3), dtype=np.uint8) * 60
    images = blocks.repeat(4, axis=1).repeat(4, axis=2)  # flat patches, like rendered frames
    ep = rollouts.Episode(images, np.zeros((steps, 3), np.float32), np.ones(steps, np.float32),
                          np.zeros(steps, bool), steps, 1)  # fmt: skip
    packed = rollouts.pack(ep)
    assert packed.images is None and len(packed.image_chunks) == 3
    assert sum(map(len, packed.image_chunks)) < images.nbytes / 2, "compressed"
    for t in (0, 24, 25, 59):
        np.testing.assert_array_equal(packed.frame(t), images[t])
    raw = {}
    for name, episode in (("plain", ep), ("packed", packed)):
        with rollouts.create(tmp_path / f"{name}.h5", 2, steps, 64, 3, {}) as f:
            rollouts.write_episode(f, 1, episode)
        with h5py.File(tmp_path / f"{name}.h5", "r") as f:
            np.testing.assert_array_equal(f["images"][1], images)
            raw[name] = [f["images"].id.read_direct_chunk((1, t, 0, 0, 0))[1] for t in (0, 25, 50)]
    assert raw["plain"] == raw["packed"], "the bytes HDF5 itself would have written"
    rollouts.verify(tmp_path / "packed.h5", "")


class _TimedEnv:
    """A stand-in pixel env that ends its episode after `end` steps: by its time limit (truncated) or
    by the world (terminated)."""

    def __init__(self, space, size: int, end: int, terminates: bool) -> None:
        self.space, self.size, self.end, self.terminates, self.t = space, size, end, terminates, 0

    def reset(self, seed=None, state=None) -> np.ndarray:
        self.t = 0
        return np.zeros((self.size, self.size, 3), np.uint8)

    def step(self, action):
        self.t += 1
        ended = self.t == self.end
        frame = np.zeros((self.size, self.size, 3), np.uint8)
        return frame, -0.1, ended and self.terminates, ended and not self.terminates


@pytest.mark.parametrize("terminates", [False, True])
@pytest.mark.parametrize("reset_on_done", [False, True])
def test_a_time_limit_is_not_a_done_unless_the_record_goes_on(smoke, monkeypatch, terminates, reset_on_done):
    """M's done head learns how the world ends an episode: CarRacing's 1000-step limit is the clock, and
    a done learned from it would end dreams at random, each paying the −100 of leaving the track."""
    from worldmodel.control import episodes
    from worldmodel.envs.pixels import action_space

    cfg = smoke("collect.max_steps=12", f"collect.reset_on_done={str(reset_on_done).lower()}")
    env = _TimedEnv(action_space(cfg.env), int(cfg.env.image_size), end=5, terminates=terminates)
    monkeypatch.setattr(episodes, "_ENVS", {episodes.OmegaConf.to_yaml(cfg.env): env})
    ep = episodes.run_episode(cfg, 0)
    marked = terminates or reset_on_done  # a record with resets marks every cut
    assert ep.length == (12 if reset_on_done else 5)
    assert bool(ep.dones[4]) == marked and not ep.dones[:4].any()
    if reset_on_done:
        assert bool(ep.dones[9]) == marked and not ep.dones[5:9].any() and not ep.dones[10:].any()
    else:
        assert ep.dones[5:].all(), "the padding after the end counts as done"
