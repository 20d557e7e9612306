"""The MLflow UI on a pipeline's runs, in headless Chromium: no experiment-type prompt, a train_vae run
that lists its dataset input, and the registered `agent` with its `champion` alias.

Needs Chromium (Debian's `chromium`) and Playwright (`pip install playwright`); skipped otherwise.
The screenshots are logged as artifacts of an MLflow run `ui-screenshots` in the test's store, and
copied to $WM_SCREENSHOTS when it is set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import children_of
from tests.test_command import run_form

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(store: Path, port: int) -> subprocess.Popen:
    uri = f"sqlite:///{store / 'mlflow.db'}"
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--port", str(port)]
    # its own process group: mlflow server starts uvicorn workers and job runners, stopped with it
    server = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    stop(server)
    raise AssertionError("mlflow server did not start")


def stop(server: subprocess.Popen) -> None:
    """The server and every process it started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(10)
            break
        except subprocess.TimeoutExpired:
            continue
    time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)  # workers that outlived the parent


@pytest.mark.slow
def test_the_mlflow_ui_shows_type_datasets_and_the_champion_agent(tmp_path):
    if CHROMIUM is None:
        pytest.skip("needs Chromium (apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    store = tmp_path / "store"
    run_form(store, "worldmodel", "stage=pipeline", "evaluate.register=true", timeout=900)
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("CarRacing-v3").experiment_id
    (pipeline,) = mlflow.search_runs([experiment], "tags.stage = 'pipeline'", output_format="list")
    vae = children_of(pipeline.info.run_id)["train_vae"].info.run_id

    port, shots = free_port(), tmp_path / "screenshots"
    shots.mkdir()
    server = serve(store, port)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            base = f"http://127.0.0.1:{port}/#"

            # The GenAI / model-training switch is the browser's; a link can choose it.
            page.goto(f"{base}/experiments/{experiment}/runs?workflowType=machine_learning")
            page.get_by_text(pipeline.info.run_name, exact=False).first.wait_for(timeout=60_000)
            page.wait_for_timeout(2000)
            assert "Select a type" not in page.content(), "the UI asks for the experiment's type"
            page.screenshot(path=shots / "experiment.png", full_page=True)

            page.goto(f"{base}/experiments/{experiment}/runs/{vae}")
            page.get_by_text(
                f"dataset.h5@{children_of(pipeline.info.run_id)['merge'].info.run_id[:8]}"
            ).first.wait_for(timeout=60_000)
            page.screenshot(path=shots / "train_vae_run.png", full_page=True)

            page.goto(f"{base}/models/agent-carracing")
            page.get_by_text("champion").first.wait_for(timeout=60_000)
            page.screenshot(path=shots / "models_agent.png", full_page=True)
            browser.close()
    finally:
        stop(server)

    client = MlflowClient()
    run = client.create_run(experiment, run_name="ui-screenshots", tags={"stage": "ui-check"})
    client.log_artifacts(run.info.run_id, str(shots), "screenshots")
    client.set_terminated(run.info.run_id, "FINISHED")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "screenshots")} == {
        f"screenshots/{n}" for n in ("experiment.png", "train_vae_run.png", "models_agent.png")
    }
    if os.environ.get("WM_SCREENSHOTS"):
        shutil.copytree(shots, os.environ["WM_SCREENSHOTS"], dirs_exist_ok=True)
