"""Hostile and careless use: crafted artifacts, killed processes, corrupt data, concurrent runs.

Each test reproduces one case of the hardening issue and checks the outcome a user should see: one line
that names the problem, a non-zero exit, and no changed or lost data.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import compose_config
from worldmodel import tracking
from worldmodel.config import PROJECT_ROOT
from worldmodel.data import latents, rollouts
from worldmodel.errors import WorldModelError
from worldmodel.stages import run_stage

# ---- helpers -------------------------------------------------------------------------------------------


def own_store(tmp_path: Path, *overrides: str):
    """A config on a store of the test's own."""
    return compose_config("experiment=smoke", f"paths.outputs={tmp_path}", *overrides)


def start_app(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "worldmodel", "experiment=smoke", f"paths.outputs={tmp_path}", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        args, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc: Linux)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def the_run(tmp_path: Path, stage: str):
    """The one run of `stage` in the test's store, or None."""
    tracking.setup(own_store(tmp_path))
    runs = mlflow.search_runs(
        experiment_names=["CarRacing-v3"], filter_string=f"tags.stage = '{stage}'", output_format="list"
    )
    assert len(runs) <= 1, runs
    return runs[0] if runs else None


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---- 2, 3: killed processes ----------------------------------------------------------------------------

LONG_COLLECT = ("stage=collect", "collect.episodes=8", "collect.max_steps=1000", "collect.workers=2")


@pytest.mark.slow
def test_kill_9_leaves_no_worker_behind(tmp_path):
    proc = start_app(tmp_path, *LONG_COLLECT)
    try:
        wait_for(lambda: len(children(proc.pid)) >= 2, 60, "the workers to start")
        time.sleep(2)
        workers = children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not any(alive(w) for w in workers), 15, f"workers {workers} to exit")
    finally:
        proc.kill()


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_cleans_up(tmp_path):
    proc = start_app(tmp_path, *LONG_COLLECT)
    try:
        wait_for(lambda: len(children(proc.pid)) >= 2, 60, "the workers to start")
        wait_for(lambda: any(tmp_path.glob("artifacts/**/*.partial")), 60, "a shard to be started")
        workers = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "interrupted (SIGTERM)" in out and "Traceback" not in out, out[-2000:]
    wait_for(lambda: not any(alive(w) for w in workers), 15, "workers to exit")
    run = the_run(tmp_path, "collect")
    assert run.info.status == "KILLED"
    assert f"stage=collect inputs.resume={run.info.run_id}" in out, "the message names the run to resume"
    assert not list(tmp_path.glob("artifacts/**/*.partial"))


# ---- 1: no code from artifacts -------------------------------------------------------------------------


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def interrupted_evolve(smoke, rnn_run: str, generations: int) -> tuple[str, tuple[str, ...]]:
    """An evolve run stopped after `generations` (KILLED), and the overrides that resume it."""
    common = (
        "stage=evolve",
        f"inputs.train_rnn={rnn_run}",
        "evolve.real_check_every=0",
        "evolve.eval_episodes=0",
    )
    first = run_stage(smoke(*common, f"evolve.generations={generations}"))
    MlflowClient().set_terminated(first, "KILLED")
    return first, common


def test_a_crafted_cma_state_runs_no_code(smoke, rnn_run, tmp_path):
    first, common = interrupted_evolve(smoke, rnn_run, 1)
    history = tracking.artifact_path(first, "cma/history.npz")
    marker = tmp_path / "pwned"
    # An object array in the npz would need pickle to load; the old pickle state file is never read.
    np.savez(history.with_suffix(".npz.tmp"), fitness=np.array([Payload(marker)], dtype=object), digest=[])
    os.replace(history.with_suffix(".npz.tmp.npz"), history)
    (history.parent / "state.pkl").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(WorldModelError, match="cma/history.npz is not a CMA-ES history") as err:
        run_stage(smoke(*common, "evolve.generations=2", f"inputs.resume={first}"))
    one_line(err)
    assert not marker.exists()


def test_a_tampered_cma_history_does_not_replay(smoke, rnn_run):
    first, common = interrupted_evolve(smoke, rnn_run, 2)
    path = tracking.artifact_path(first, "cma/history.npz")
    with np.load(path) as f:
        fitness, digest = f["fitness"], f["digest"]
    digest[1] = "0" * 64
    np.savez(path.with_name("tampered.npz"), fitness=fitness, digest=digest)
    os.replace(path.with_name("tampered.npz"), path)
    with pytest.raises(WorldModelError, match="does not replay at generation 1"):
        run_stage(smoke(*common, "evolve.generations=3", f"inputs.resume={first}"))


# ---- 7: concurrent runs --------------------------------------------------------------------------------


def test_each_process_gets_its_own_hydra_directory(tmp_path):
    procs = [start_app(tmp_path, "stage=merge", "inputs.collect=nope") for _ in range(2)]
    for p in procs:
        p.communicate(timeout=120)
    dirs = sorted(p.name for p in (tmp_path / "runs").glob("*/*") if p.is_dir())
    assert len(dirs) == 2, dirs


# ---- 4: corrupt chunks ---------------------------------------------------------------------------------


def damage_a_chunk(path: Path, dataset: str = "images", chunk: int = 1) -> None:
    """Overwrite bytes in the middle of one compressed chunk; the file's size and structure stay intact."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        f.write(np.random.default_rng(0).integers(0, 256, 16, dtype=np.uint8).tobytes())


def test_a_damaged_chunk_is_caught_by_merge_and_repaired_by_collect(tmp_path):
    collect = run_stage(own_store(tmp_path, "stage=collect", "collect.workers=1"))
    shard = tracking.artifact_path(collect, "shards/shard_00001.h5")
    with h5py.File(shard, "r") as f:
        good = f["images"][:]
    size = shard.stat().st_size
    damage_a_chunk(shard)
    assert shard.stat().st_size == size

    with pytest.raises(WorldModelError, match=r"shard_00001.h5: damaged data in dataset 'images'") as err:
        run_stage(own_store(tmp_path, "stage=merge", f"inputs.collect={collect}"))
    assert f"stage=collect inputs.resume={collect}" in one_line(err)
    assert not list(tmp_path.glob("artifacts/**/dataset.h5*")), "nothing written"

    assert run_stage(own_store(tmp_path, "stage=collect", f"inputs.resume={collect}")) == collect
    with h5py.File(shard, "r") as f:
        np.testing.assert_array_equal(f["images"][:], good)  # the same seeds give the same episodes
    merge = run_stage(own_store(tmp_path, "stage=merge", f"inputs.collect={collect}"))
    assert mlflow.get_run(merge).info.status == "FINISHED"


def test_checksums_catch_damage_in_the_merged_dataset(tmp_path):
    collect = run_stage(own_store(tmp_path, "stage=collect", "collect.workers=1"))
    merge = run_stage(own_store(tmp_path, "stage=merge", f"inputs.collect={collect}"))
    dataset = tracking.artifact_path(merge, "dataset.h5")
    with h5py.File(dataset, "r") as f:
        assert all(f[k].fletcher32 for k in ("images", "actions", "rewards", "dones", "lengths", "episode"))
    damage_a_chunk(dataset, "actions", 0)
    with pytest.raises(WorldModelError, match="damaged data in dataset 'actions', episode 0"):
        rollouts.verify(dataset, "re-run merge")
    for chunk in range(0, 16, 2):  # images of every episode, wherever the split put it
        damage_a_chunk(dataset, "images", chunk)
    with pytest.raises(WorldModelError, match="dataset.h5: cannot be read .*run merge again") as err:
        run_stage(own_store(tmp_path, "stage=train_vae", f"inputs.merge={merge}", "train_vae.num_workers=1"))
    one_line(err)
    assert the_run(tmp_path, "train_vae").info.status == "FAILED"


# ---- 5: foreign and mismatched files -------------------------------------------------------------------


def test_a_foreign_hdf5_as_dataset_is_one_line(tmp_path):
    collect = run_stage(own_store(tmp_path, "stage=collect", "collect.workers=1"))
    merge = run_stage(own_store(tmp_path, "stage=merge", f"inputs.collect={collect}"))
    dataset = tracking.artifact_path(merge, "dataset.h5")
    dataset.unlink()
    with h5py.File(dataset, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(WorldModelError, match="not a worldmodel rollouts file") as err:
        run_stage(own_store(tmp_path, "stage=train_vae", f"inputs.merge={merge}"))
    one_line(err)
    assert the_run(tmp_path, "train_vae") is None


def test_latents_of_another_size_are_one_line(smoke, encode_run, tmp_path):
    tracking.setup(smoke())
    path = tracking.artifact_path(encode_run, "latents.h5")
    client = MlflowClient()
    fake = client.create_run(client.get_run(encode_run).info.experiment_id, tags={"stage": "encode"})
    client.set_tag(fake.info.run_id, "latent_size", "32")
    client.set_tag(fake.info.run_id, "upstream.train_vae", "x")
    with h5py.File(path, "r") as src, h5py.File(tmp_path / "latents.h5", "w") as f:
        for key in src:
            src.copy(key, f)
        f.attrs.update(src.attrs)
        for name in ("mu", "logvar"):
            del f[name]
            f[name] = src[name][..., :16]  # 16-d latents in a run that claims 32
    client.log_artifact(fake.info.run_id, str(tmp_path / "latents.h5"))
    client.set_terminated(fake.info.run_id, "FINISHED")
    with pytest.raises(WorldModelError, match="holds 16-d latents but latent.size=32") as err:
        run_stage(smoke("stage=train_rnn", f"inputs.encode={fake.info.run_id}"))
    one_line(err)


# ---- 6: resume -----------------------------------------------------------------------------------------


def test_resume_keeps_the_upstream_run_it_started_with(smoke, encode_run, vae_run):
    first = run_stage(smoke("stage=train_rnn", f"inputs.encode={encode_run}", "train_rnn.epochs=1"))
    MlflowClient().set_terminated(first, "KILLED")
    newer = run_stage(smoke("stage=encode", f"inputs.train_vae={vae_run}"))  # now the latest encode run
    assert run_stage(smoke("stage=train_rnn", f"inputs.resume={first}")) == first
    assert mlflow.get_run(first).data.tags["upstream.encode"] == encode_run != newer


@pytest.mark.parametrize("stage", ["merge", "encode", "evaluate", "dream"])
def test_stages_without_resume_refuse_it(stage):
    with pytest.raises(WorldModelError, match=f"inputs.resume.*{stage} cannot resume a run"):
        run_stage(compose_config("experiment=smoke", f"stage={stage}", "inputs.resume=abc"))


def test_the_pipeline_hands_resume_to_its_first_stage_only():
    from worldmodel.stages import pipeline

    pipeline.validate(
        compose_config("stage=pipeline", "pipeline.stages=[collect,merge]", "inputs.resume=abc")
    )
    with pytest.raises(WorldModelError, match="merge cannot resume"):
        pipeline.validate(
            compose_config("stage=pipeline", "pipeline.stages=[merge,encode]", "inputs.resume=abc")
        )


@pytest.mark.slow
def test_resume_refuses_a_live_run_and_a_new_run_reaps_a_dead_one(tmp_path):
    proc = start_app(tmp_path, *LONG_COLLECT)
    try:
        wait_for(lambda: any(tmp_path.glob("artifacts/**/*.partial")), 90, "a shard to be started")
        live = the_run(tmp_path, "collect")
        with pytest.raises(
            WorldModelError, match=f"still running \\(process {proc.pid} on this host\\)"
        ) as err:
            run_stage(own_store(tmp_path, "stage=collect", f"inputs.resume={live.info.run_id}"))
        one_line(err)
        assert proc.poll() is None and mlflow.get_run(live.info.run_id).info.status == "RUNNING"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert mlflow.get_run(live.info.run_id).info.status == "RUNNING"  # kill -9: nobody could end it
    run_stage(own_store(tmp_path, "stage=collect", "collect.workers=1", "seed=5"))
    dead = mlflow.get_run(live.info.run_id)
    assert dead.info.status == "KILLED" and dead.data.tags["killed_reason"]
    assert not list(tmp_path.glob("artifacts/**/*.partial"))
    assert (
        run_stage(own_store(tmp_path, *LONG_COLLECT[:3], f"inputs.resume={live.info.run_id}"))
        == live.info.run_id
    )


# ---- 8: validation at the first stage that can know ----------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("env.image_size=50", "env.image_size"),
        ("policy.refresh=0", "policy.refresh"),
        ("collect.episodes=true", "collect.episodes"),
        ("collect.workers=true", "collect.workers"),
        ("policy=random policy.refresh=-1", "policy.refresh"),
        ("policy=brownian policy.dt=0", "policy.dt"),
    ],
)
def test_collect_refuses_bad_settings_before_any_work(tmp_path, override, key):
    with pytest.raises(WorldModelError, match=f"config key '{key}'") as err:
        run_stage(own_store(tmp_path, "stage=collect", *override.split()))
    one_line(err)
    assert not (tmp_path / "artifacts").exists(), "no run, no file"


def test_true_is_not_an_integer():
    with pytest.raises(WorldModelError, match="config key 'evolve.popsize'"):
        run_stage(compose_config("experiment=smoke", "stage=evolve", "evolve.popsize=true"))


# ---- 9: bounded memory ---------------------------------------------------------------------------------


def test_latents_are_streamed_a_bounded_number_of_episodes_at_a_time(smoke, encode_run):
    tracking.setup(smoke())
    path = tracking.artifact_path(encode_run, "latents.h5")
    order = np.array([3, 0, 2, 1])
    chunks = list(latents.stream(path, order, per_read=3))
    assert [len(c["lengths"]) for c in chunks] == [3, 1]
    with h5py.File(path, "r") as f:
        for name in ("mu", "actions", "dones"):
            np.testing.assert_array_equal(np.concatenate([c[name] for c in chunks]), f[name][:][order])
        mu0, logvar0 = latents.first_steps(path, order)
        np.testing.assert_array_equal(mu0, f["mu"][:, 0][order])
        np.testing.assert_array_equal(logvar0, f["logvar"][:, 0][order])


def test_train_rnn_with_a_buffer_smaller_than_the_data_is_deterministic(smoke, encode_run):
    cfg = (
        "stage=train_rnn",
        f"inputs.encode={encode_run}",
        "train_rnn.epochs=2",
        "train_rnn.buffer_episodes=2",
    )
    a, b = (mlflow.get_run(run_stage(smoke(*cfg))).data.metrics for _ in range(2))
    for key in ("train/nll", "val/nll", "val/baseline_nll"):
        assert np.isfinite(a[key]) and a[key] == b[key], key
