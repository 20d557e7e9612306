"""Hostile and careless use: crafted artifacts, killed processes, corrupt data, concurrent runs.

Each test reproduces one case of the hardening issue and checks the outcome a user should see: one line
that names the problem, a non-zero exit, and no changed or lost data.
"""

from __future__ import annotations

import contextlib
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


def start_app(tmp_path: Path, *overrides: str, **popen) -> subprocess.Popen:
    args = [sys.executable, "-m", "worldmodel", "experiment=smoke", f"paths.outputs={tmp_path}", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        args, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def run_app(tmp_path: Path, *overrides: str, timeout: float = 120, **popen) -> tuple[int, str]:
    """Run the app to its end: (exit code, what it printed)."""
    proc = start_app(tmp_path, *overrides, **popen)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, out


def error_line(out: str) -> str:
    """The app's one error line; no traceback anywhere."""
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "ERROR" in line or line.startswith(("collect:", "merge:"))]
    errors = [line for line in errors if "%|" not in line]  # not a progress bar
    assert len(errors) == 1, out[-3000:]
    return errors[0]


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
        wait_for(lambda: any(tmp_path.glob("artifacts/**/*.partial.h5")), 60, "a shard to be started")
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
    assert not list(tmp_path.glob("artifacts/**/*.partial.h5"))


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
        wait_for(lambda: any(tmp_path.glob("artifacts/**/*.partial.h5")), 90, "a shard to be started")
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
    assert not list(tmp_path.glob("artifacts/**/*.partial.h5"))
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


# ==== the reliability issue: cross-env inputs, NaN, full disks, dead servers, unknown keys, crafted files,
# symlinks. Section numbers are the issue's.


def fake_run(cfg, stage: str, files: dict[str, Path], tags=None, params=None, metrics=None) -> str:
    """A FINISHED run of `stage` in cfg's store holding `files` ({artifact folder: local file}). It
    starts at the epoch, so a stage that looks for the latest run of `stage` never picks it up: the
    store's other tests do not depend on the order the tests run in."""
    tracking.setup(cfg)
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(str(cfg.mlflow.experiment)).experiment_id
    tags = {"stage": stage, "env": str(cfg.env.id), **(tags or {})}
    run = client.create_run(experiment, start_time=1, tags=tags)
    for key, value in (params or {}).items():
        client.log_param(run.info.run_id, key, value)
    for key, value in (metrics or {}).items():
        client.log_metric(run.info.run_id, key, value)
    for folder, path in files.items():
        client.log_artifact(run.info.run_id, str(path), folder or None)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def no_partials(root: Path) -> None:
    assert not [p for p in root.rglob("*") if ".partial" in p.name], "a partial file was left"


# ---- 1: inputs from another env


def test_a_carracing_controller_is_refused_by_cartpole_evaluate(smoke, evolve_run):
    with pytest.raises(
        WorldModelError, match=r"has env=CarRacing-v3, this config needs env=CartPole-v1"
    ) as e:
        run_stage(smoke("env=cartpole", "stage=evaluate", f"inputs.evolve={evolve_run}"))
    one_line(e)


def test_collecting_with_a_controller_of_another_env_is_refused(smoke, evolve_run):
    with pytest.raises(WorldModelError, match=r"inputs.evolve=.* has env=CarRacing-v3") as e:
        run_stage(smoke("env=cartpole", "stage=collect", "policy=controller", f"policy.run_id={evolve_run}"))
    one_line(e)


def test_merge_refuses_shards_of_another_env(tmp_path, smoke, collect_run):
    with pytest.raises(WorldModelError, match=r"inputs.collect=.* has env=CarRacing-v3") as e:
        run_stage(smoke("env=cartpole", "stage=merge", f"inputs.collect={collect_run}"))
    one_line(e)


def test_a_controller_checks_its_actions_against_the_env(smoke, evolve_run):
    from worldmodel.control.agent import load_controller
    from worldmodel.envs.pixels import action_space

    tracking.setup(smoke())
    path = tracking.agent_files(mlflow.get_run(evolve_run))["controller"]
    assert load_controller(path, action_space(smoke().env)).action_dim == 3
    cartpole = compose_config("env=cartpole")
    with pytest.raises(WorldModelError, match="acts with 3-d box actions but the env takes 2-d discrete"):
        load_controller(path, action_space(cartpole.env))


# ---- 2: NaN and inf


def copy_h5(source: Path, out: Path) -> Path:
    """A copy of an HDF5 file, datasets and attributes, to change without touching the original."""
    with h5py.File(source, "r") as src, h5py.File(out, "w") as f:
        for key in src:
            src.copy(key, f)
        f.attrs.update(src.attrs)
    return out


def latents_with(tmp_path: Path, source: Path, name: str, index: tuple, value: float) -> Path:
    out = copy_h5(source, tmp_path / "latents.h5")
    with h5py.File(out, "r+") as f:
        f[name][index] = value
    return out


def test_a_nan_in_the_latents_stops_train_rnn_naming_file_dataset_and_index(tmp_path, smoke, encode_run):
    tracking.setup(smoke())
    source = tracking.artifact_path(encode_run, "latents.h5")
    with h5py.File(source, "r") as f:
        episode = int(f["split/train"][0])
    bad = latents_with(tmp_path, source, "mu", (episode, 5, 1), np.nan)
    tags = {k: mlflow.get_run(encode_run).data.tags[k] for k in ("latent_size", "upstream.train_vae")}
    fake = fake_run(smoke(), "encode", {"": bad}, tags)
    with pytest.raises(
        WorldModelError, match=rf"latents.h5: dataset 'mu' holds nan at index \[{episode}, 5, 1\]"
    ):
        run_stage(smoke("stage=train_rnn", f"inputs.encode={fake}"))
    runs = mlflow.search_runs(
        experiment_names=["CarRacing-v3"],
        filter_string=f"tags.`upstream.encode` = '{fake}'",
        output_format="list",
    )
    assert [r.info.status for r in runs] == ["FAILED"]


def test_nan_first_latents_stop_dream_evolve_before_a_controller_is_saved(tmp_path, smoke, rnn_run):

    tracking.setup(smoke())
    rnn = mlflow.get_run(rnn_run)
    source = tracking.artifact_path(rnn.data.tags["upstream.encode"], "latents.h5")
    with h5py.File(source, "r") as f:
        episode = int(f["split/train"][-1])
    bad = latents_with(tmp_path, source, "logvar", (episode, 0, 0), np.inf)
    encode = fake_run(smoke(), "encode", {"": bad}, {"latent_size": rnn.data.tags["latent_size"]})
    tags = {k: rnn.data.tags[k] for k in ("latent_size", "upstream.train_vae")} | {"upstream.encode": encode}
    fake_rnn = fake_run(smoke(), "train_rnn", {"checkpoints": tracking.checkpoint_path(rnn_run)}, tags)
    with pytest.raises(
        WorldModelError, match=rf"dataset 'logvar' holds inf at index \[{episode}, 0, 0\]"
    ) as e:
        run_stage(smoke("stage=evolve", "evolve.mode=dream", f"inputs.train_rnn={fake_rnn}"))
    one_line(e)
    runs = mlflow.search_runs(
        experiment_names=["CarRacing-v3"],
        filter_string=f"tags.`upstream.train_rnn` = '{fake_rnn}'",
        output_format="list",
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "controller.pt" not in tracking.list_artifacts(runs[0].info.run_id, "")


def test_a_nan_fitness_is_refused():
    from worldmodel.stages.evolve import _check_fitness

    _check_fitness(np.array([1.0, -3.0]), 0, "dream")
    with pytest.raises(WorldModelError, match="candidate 1 of generation 4 has fitness nan"):
        _check_fitness(np.array([1.0, np.nan]), 4, "dream")


@pytest.mark.slow  # train_vae's start-up: about 12 s
def test_a_dataset_of_blank_frames_is_refused_by_train_vae(tmp_path, smoke, dataset_path, merge_run):
    blank = copy_h5(dataset_path, tmp_path / "dataset.h5")
    with h5py.File(blank, "r+") as f:
        f["images"][...] = 0
    fake = fake_run(smoke(), "merge", {"": blank}, {"image_size": "64"}, metrics={"episodes": 4})
    with pytest.raises(
        WorldModelError, match="validation frames are the one value 0: the env rendered nothing"
    ) as e:
        run_stage(smoke("stage=train_vae", f"inputs.merge={fake}"))
    one_line(e)


# ---- 3, 4: a full disk, a file-size limit, a read-only folder


def file_size_limit(nbytes: int):
    """A preexec_fn: files may not grow past `nbytes` (EFBIG instead of the default SIGXFSZ death)."""

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


BIG_SHARD = ("env=carracing", "collect.episodes=4", "collect.max_steps=500", "collect.episodes_per_shard=4")


@pytest.mark.slow  # a subprocess or two: the in-process checks of the same code stay fast
def test_collect_past_a_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    code, out = run_app(tmp_path, "stage=collect", *BIG_SHARD, preexec_fn=file_size_limit(2_000_000))
    assert code == 2 and "the file-size limit (ulimit -f) is 1.9 MB, collect writes about" in error_line(out)
    assert the_run(tmp_path, "collect").info.status == "FAILED"
    no_partials(tmp_path)


@pytest.mark.slow
def test_merge_past_a_file_size_limit_is_one_line_not_a_crash(tmp_path):
    code, out = run_app(tmp_path, "stage=collect", *BIG_SHARD, "collect.workers=2")
    assert code == 0, out[-2000:]
    code, out = run_app(tmp_path, "stage=merge", "env=carracing", preexec_fn=file_size_limit(2_500_000))
    assert code == 2 and "merge writes about" in error_line(out)
    assert the_run(tmp_path, "merge").info.status == "FAILED"
    no_partials(tmp_path)


def mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]).returncode
    ):
        pytest.skip("needs root and mount, for a small file system")


@pytest.mark.slow
@pytest.mark.parametrize("store", ["on the disk", "elsewhere"])
def test_a_disk_that_fills_during_collect_ends_the_run_failed_in_one_line(tmp_path, store):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=24m")
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}" if store == "elsewhere" else None
    extra = [f"mlflow.tracking_uri={uri}"] if uri else []
    try:
        proc = start_app(
            disk,
            "stage=collect",
            *BIG_SHARD[:3],
            "collect.episodes=8",
            "collect.episodes_per_shard=1",
            *extra,
        )
        wait_for(lambda: any(disk.glob("artifacts/*/artifacts/shards/shard_00000.h5")), 120, "a first shard")
        with open(disk / "filler", "wb") as f:  # someone else fills the disk
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 2**20)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "the disk is full" in error_line(out)
        (disk / "filler").unlink()
        tracking.setup(own_store(disk, *extra))
        runs = mlflow.search_runs(experiment_names=["CarRacing-v3"], output_format="list")
        assert [r.info.status for r in runs] == ["FAILED"]  # recorded, even on the full disk
        no_partials(disk)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.slow
def test_merge_with_300_kb_free_is_one_line_not_a_crash(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=16m")
    try:
        code, out = run_app(disk, "stage=collect", *BIG_SHARD)
        assert code == 0, out[-2000:]
        stat = os.statvfs(disk)
        with open(disk / "filler", "wb") as f:  # leave about 300 KB
            f.write(b"\0" * (stat.f_bavail * stat.f_frsize - 300 * 2**10))
        code, out = run_app(disk, "stage=merge", "env=carracing")
        assert code == 2, out[-2000:]
        assert "merge needs about" in error_line(out) or "the disk is full" in error_line(out)
        assert the_run(disk, "merge") is None or the_run(disk, "merge").info.status == "FAILED"
        no_partials(disk)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.slow  # a subprocess or two: the in-process checks of the same code stay fast
def test_a_read_only_outputs_folder_is_one_line(tmp_path):
    outputs = tmp_path / "ro"
    if os.geteuid() == 0:
        mount_tmpfs(outputs, "ro,size=1m")
    else:
        outputs.mkdir()
        outputs.chmod(0o555)
    try:
        code, out = run_app(outputs / "store", "stage=collect")
        assert code == 2 and f"cannot create {outputs / 'store'}" in out and "Traceback" not in out, out
        code, out = run_app(outputs, "stage=collect")
        assert code == 2 and f"{outputs} is not writable" in out and "Traceback" not in out, out
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(outputs)])


def test_disk_errors_are_recognised_inside_the_errors_that_wrap_them():
    import errno

    from worldmodel.files import disk_error

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/x/shard.h5")
        except OSError as inner:
            raise RuntimeError("the writer failed") from inner
    except RuntimeError as outer:
        assert "the disk is full writing /x/shard.h5: free space" in str(disk_error(outer))
    assert "disk is full" in str(disk_error(Exception("(sqlite3.OperationalError) database or disk is full")))
    assert disk_error(ValueError("something else")) is None


# ---- 5: tracking URIs


@pytest.mark.slow  # a subprocess or two: the in-process checks of the same code stay fast
@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://127.0.0.1:9", "tracking URI http://127.0.0.1:9 does not answer"),
        ("file:///tmp/wm-file-store", "is a file store, which MLflow 3 refuses"),
    ],
)
def test_a_tracking_uri_that_cannot_serve_is_one_line_before_any_work(tmp_path, uri, message):
    code, out = run_app(tmp_path, "stage=collect", f"mlflow.tracking_uri={uri}", timeout=60)
    assert code == 2 and message in error_line(out)
    assert not (tmp_path / "artifacts").exists()


# ---- 6: unknown keys


@pytest.mark.slow  # a subprocess or two: the in-process checks of the same code stay fast
def test_an_added_key_the_config_does_not_know_is_refused(tmp_path):
    code, out = run_app(tmp_path, "stage=collect", "+collect.episdoes=2")
    line = error_line(out)
    assert code == 2 and "unknown config key 'collect.episdoes' (from +collect.episdoes=2)" in line
    assert "did you mean 'collect.episodes'?" in line
    assert the_run(tmp_path, "collect") is None


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["++collect.episdoes=2"], "collect.episdoes"),
        (["+foo=1"], "foo"),
        (["++collect.episodes=1", "collect.workers=1"], None),  # a forced key that exists is taken
        (["+hydra.job.env_set.X=1"], None),  # Hydra's own keys are Hydra's business
    ],
)
def test_refuse_added_keys_knows_the_config(overrides, refused):
    from hydra import initialize_config_dir

    from worldmodel.config import CONFIG_DIR, refuse_added_keys

    groups = ["env", "stage", "experiment", "latent", "policy", "device", "backend"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        if refused is None:
            refuse_added_keys(overrides, groups)
        else:
            with pytest.raises(WorldModelError, match=f"unknown config key '{refused}'"):
                refuse_added_keys(overrides, groups)


# ---- 7: crafted HDF5 that declares huge shapes


def crafted(path: Path, like: Path, episodes: int, merged: bool = False) -> Path:
    """A rollouts file that declares `episodes` episodes and holds none (a few KB)."""
    info = rollouts.inspect(like)
    f = rollouts.create(path, episodes, info.steps, info.image_size, info.action_dim, info.attrs)
    if merged:
        f.create_dataset("split/train", data=np.arange(episodes - 1, dtype=np.int64)[:10])
        f.create_dataset("split/val", data=np.array([episodes - 1], np.int64))
    f.close()
    return path


def test_a_shard_that_declares_a_billion_episodes_is_refused_before_any_read(tmp_path, smoke, collect_run):
    tracking.setup(smoke())
    shard = crafted(
        tmp_path / "shard_00000.h5", tracking.artifact_path(collect_run, "shards/shard_00000.h5"), 10**9
    )
    assert shard.stat().st_size < 100_000
    params = {"collect.episodes": "4", "collect.max_steps": "40"}
    fake = fake_run(smoke(), "collect", {"shards": shard}, {"image_size": "64"}, params)
    with pytest.raises(
        WorldModelError, match=r"shard_00000.h5: dataset 'images' declares shape \(1000000000,"
    ) as e:
        run_stage(smoke("stage=merge", f"inputs.collect={fake}"))
    assert "the file holds 0 of its" in one_line(e)


def test_a_dataset_that_declares_a_million_episodes_is_refused_by_train_vae(tmp_path, smoke, dataset_path):
    dataset = crafted(tmp_path / "dataset.h5", dataset_path, 10**6, merged=True)
    fake = fake_run(smoke(), "merge", {"": dataset}, {"image_size": "64"}, metrics={"episodes": 4})
    with pytest.raises(WorldModelError, match=r"dataset.h5: dataset 'images' declares shape \(1000000,") as e:
        run_stage(smoke("stage=train_vae", f"inputs.merge={fake}"))
    one_line(e)


def test_shards_that_hold_more_episodes_than_their_run_collected_are_refused(tmp_path, smoke, collect_run):
    tracking.setup(smoke())
    shards = [tracking.artifact_path(collect_run, f"shards/shard_0000{k}.h5") for k in (0, 1)]
    params = {"collect.episodes": "2", "collect.max_steps": "40"}  # the run says 2; its shards hold 4
    client = MlflowClient()
    fake = fake_run(smoke(), "collect", {"shards": shards[0]}, {"image_size": "64"}, params)
    client.log_artifact(fake, str(shards[1]), "shards")
    with pytest.raises(WorldModelError, match="but collect run .* was asked for 2 episodes of 40 steps"):
        run_stage(smoke("stage=merge", f"inputs.collect={fake}"))


# ---- 8: symlinks and what clean-up may delete


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def dead_run(cfg, stage: str) -> tuple[str, Path]:
    """A RUNNING run of `stage` whose process is gone (as kill -9 leaves one), and its artifact folder."""
    import socket

    tracking.setup(cfg)
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(str(cfg.mlflow.experiment)).experiment_id
    tags = {"stage": stage, "env": str(cfg.env.id), "host": socket.gethostname(), "pid": str(dead_pid())}
    run = client.create_run(experiment, tags=tags)
    return run.info.run_id, Path(run.info.artifact_uri.removeprefix("file://"))


@pytest.mark.slow  # a collect and a merge of its own store
def test_the_reaper_removes_only_the_partial_files_the_stage_writes(tmp_path):
    cfg = own_store(tmp_path, "stage=merge")
    collect = run_stage(own_store(tmp_path, "stage=collect", "collect.workers=1"))
    plain, root = dead_run(cfg, "merge")
    root.mkdir(parents=True)
    (root / "dataset.partial.h5").write_bytes(b"half a dataset")
    (root / "draft.partial.docx").write_bytes(b"someone's document")
    linked, link = dead_run(cfg, "merge")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "dataset.partial.h5").write_bytes(b"not this run's to delete")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(elsewhere)

    run_stage(own_store(tmp_path, "stage=merge", f"inputs.collect={collect}"))
    assert {mlflow.get_run(r).info.status for r in (plain, linked)} == {"KILLED"}
    assert not (root / "dataset.partial.h5").exists()
    assert (root / "draft.partial.docx").read_bytes() == b"someone's document"
    assert (elsewhere / "dataset.partial.h5").exists(), "the reaper followed a symlink out of the store"


@pytest.mark.slow  # a collect of its own store
def test_resume_does_not_delete_through_a_symlinked_shards_folder(tmp_path):
    collect = run_stage(own_store(tmp_path, "stage=collect", "collect.workers=1"))
    shards = tracking.artifact_path(collect, "shards/shard_00000.h5").parent
    elsewhere = tmp_path / "other-disk"
    shards.rename(elsewhere)
    shards.symlink_to(elsewhere)
    (elsewhere / "shard_00001.partial.h5").write_bytes(b"on another disk")
    MlflowClient().set_terminated(collect, "KILLED")
    with pytest.raises(
        WorldModelError, match="cannot list its artifacts 'shards'.*outside the artifact"
    ) as e:
        run_stage(own_store(tmp_path, "stage=collect", f"inputs.resume={collect}"))  # MLflow refuses it
    one_line(e)
    assert (elsewhere / "shard_00001.partial.h5").exists()


def test_remove_partials_takes_exact_names_only(tmp_path):
    from worldmodel.files import partial_of, remove_partials

    assert partial_of("shards/shard_*.h5") == Path("shards/shard_*.partial.h5")
    (tmp_path / "shards").mkdir()
    keep = [tmp_path / "shards" / "notes.partial.txt", tmp_path / "shard_00001.partial.h5"]
    gone = [tmp_path / "shards" / "shard_00001.partial.h5"]
    for path in keep + gone:
        path.write_text("x")
    assert remove_partials(tmp_path, ["shards/shard_*.h5"]) == gone
    assert all(p.exists() for p in keep)


# ---- 9: small ones (inputs.collect=[] is in test_config, the interrupt message in the SIGTERM test above)


@pytest.mark.slow
def test_cma_is_told_the_very_solutions_it_asked_for(smoke, rnn_run):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a hidden layer: over 300 parameters, where CMA-ES samples with TPA
        run_stage(
            smoke("stage=evolve", f"inputs.train_rnn={rnn_run}", "evolve.hidden=16", "evolve.generations=4")
        )
    assert not [w for w in caught if "orphan" in str(w.message)]
