"""backend=ray on a real Ray head started on 127.0.0.1 with 2 CPUs, as a user would (`ray start --head`):
the same data and fitness as backend=local, a killed worker's task retried, the runs in MLflow.

Slow (`make test-ray`, part of `make test-all`): it needs the `ray` extra, and the head plus actors that
each import torch take about a minute on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import in_order, shard_arrays
from worldmodel import tracking
from worldmodel.config import PROJECT_ROOT
from worldmodel.stages import run_stage

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="backend=ray needs the extra: pip install -e '.[ray]'")
# The tasks below live in this test module, which Ray's workers cannot import: send them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on loopback, 2 CPUs; stages find it through RAY_ADDRESS. Without Ray's token
    authentication (loopback only): a driver reads its auth mode when `ray` is imported, which this
    module has done already (README: a real cluster sets RAY_AUTH_MODE=token before Python starts)."""
    cli = str(Path(sys.executable).with_name("ray"))  # the venv's, beside this Python
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's sockets live under it
    address = f"127.0.0.1:{_free_port()}"
    subprocess.run(
        [cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={address.split(':')[1]}",
         "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
        check=True,
        capture_output=True,
        env=os.environ | {"RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    yield address
    if old is None:
        del os.environ["RAY_ADDRESS"]
    else:
        os.environ["RAY_ADDRESS"] = old
    subprocess.run([cli, "stop", "--force"], capture_output=True)
    shutil.rmtree(temp, ignore_errors=True)


def test_collect_on_ray_gives_the_local_data_and_is_tracked(ray_head, smoke, collect_run):
    run_id = run_stage(smoke("stage=collect", "backend=ray"))
    tracking.setup(smoke())
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["collect.episodes"] == "4"
    assert run.data.metrics["episodes"] == 4 and run.data.tags["backend"] == "ray"
    on_ray, local = shard_arrays(run_id), shard_arrays(collect_run)
    assert on_ray["images"].shape == local["images"].shape and on_ray["images"].dtype == np.uint8
    for key in local:
        np.testing.assert_array_equal(on_ray[key], local[key], err_msg=key)


def test_real_mode_evolve_on_ray_gives_the_local_fitness(ray_head, smoke, rnn_run):
    common = (
        "stage=evolve",
        "evolve.mode=real",
        "evolve.generations=1",
        "evolve.eval_episodes=2",
        f"inputs.train_rnn={rnn_run}",
    )
    local = run_stage(smoke(*common))
    on_ray = run_stage(smoke(*common, "backend=ray"))
    tracking.setup(smoke())
    client = MlflowClient()
    for key in ("fitness/best", "fitness/mean", "fitness/worst", "eval/score_mean"):
        a = [m.value for m in client.get_metric_history(local, key)]
        b = [m.value for m in client.get_metric_history(on_ray, key)]
        assert a and a == b, key
    run = mlflow.get_run(on_ray)
    assert run.info.status == "FINISHED" and run.data.tags["upstream.train_rnn"] == rnn_run
    assert run.data.tags["backend"] == "ray" and mlflow.get_run(local).data.tags["backend"] == "local"
    names = {a.path for a in client.list_artifacts(on_ray)}
    assert {"controller.pt", "scores.csv", "cma"} <= names


def _init(marker_dir: str) -> str:
    return marker_dir


def _square_or_die(marker_dir: str, payload: int) -> tuple[int, int]:
    if payload == 3:  # the first attempt at task 3 kills its worker process; Ray retries it
        marker = Path(marker_dir) / "died-once"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return payload * payload, os.getpid()


def test_a_killed_ray_worker_is_restarted_and_its_task_retried(ray_head, tmp_path):
    from worldmodel.parallel.ray_pool import RayPool

    with RayPool(2, _init, (str(tmp_path),), _square_or_die, timeout=120) as pool:
        results = in_order(pool, list(range(6)))
    assert [r for r, _ in results] == [0, 1, 4, 9, 16, 25]
    assert (tmp_path / "died-once").exists(), "a worker was killed"
    assert ray.is_initialized() is False, "the pool disconnects the driver it connected"


def _sleep_once(marker_dir: str, payload: int) -> int:
    marker = Path(marker_dir) / f"slept-{payload}"
    if payload == 1 and not marker.exists():
        marker.touch()
        time.sleep(3600)
    return payload


def test_a_hung_ray_worker_is_killed_after_the_timeout_and_its_task_retried(ray_head, tmp_path):
    from worldmodel.parallel.ray_pool import RayPool

    with RayPool(2, _init, (str(tmp_path),), _sleep_once, timeout=5) as pool:
        assert in_order(pool, [0, 1, 2]) == [0, 1, 2]
        assert pool.replaced == 1


def test_a_cluster_that_does_not_answer_is_one_line_before_any_work(tmp_path, monkeypatch):
    from tests.conftest import compose_config
    from worldmodel.errors import WorldModelError

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")  # nothing listens there
    cfg = compose_config("stage=collect", "experiment=smoke", f"paths.outputs={tmp_path}", "backend=ray")
    with pytest.raises(
        WorldModelError, match=r"no Ray cluster answers at 127\.0\.0\.1:\d+ .*ray start --head"
    ):
        run_stage(cfg)
    assert not (tmp_path / "mlflow.db").exists(), "refused before any run was created"


def test_the_stage_form_collects_on_ray_the_local_data(ray_head, tmp_path, collect_run):
    """`python -m worldmodel.stage=collect backend=ray`, typed as a user would, in a subprocess."""
    out = subprocess.run(
        [sys.executable, "-m", "worldmodel.stage=collect", "backend=ray", "collect.workers=2",
         "experiment=smoke", f"paths.outputs={tmp_path}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
        env=os.environ | {"RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    files = sorted(tmp_path.glob("artifacts/*/artifacts/shards/shard_*.h5"))
    local = shard_arrays(collect_run)
    with h5py.File(files[0], "r") as first, h5py.File(files[1], "r") as second:
        for key in local:
            np.testing.assert_array_equal(np.concatenate([first[key][:], second[key][:]]), local[key], key)
