"""env=doom: VizDoom's Take Cover from pixels, the paper's dream experiment (the `.[doom]` extra)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import children_of, compose_config
from tests.fingerprint import check_golden, fresh_torch
from worldmodel import tracking
from worldmodel.config import PROJECT_ROOT
from worldmodel.envs.pixels import make_env
from worldmodel.errors import WorldModelError
from worldmodel.models.controller import Controller
from worldmodel.stages import run_stage

pytest.importorskip("vizdoom", reason="env=doom needs the doom extra: make setup-doom")

NOOP, LEFT, RIGHT = np.eye(3, dtype=np.float32)


def _engines() -> set[int]:
    """The VizDoom engine processes running now (each env starts one), from /proc."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"vizdoom/vizdoom" in (proc / "cmdline").read_bytes().split(b"\0")[0]:
                pids.add(int(proc.name))
        except OSError:  # gone meanwhile
            pass
    return pids


def test_frames_are_the_whole_screen_at_64_and_actions_are_one_hot():
    env = make_env(compose_config("env=doom").env)
    try:
        assert env.space.kind == "discrete" and env.space.dim == 3
        frame = env.reset(seed=3)
        raw, _ = env.env.env.reset(seed=3)  # the env under worldmodel's frames wrapper
        expected = np.array(Image.fromarray(raw["screen"]).resize((64, 64), Image.Resampling.LANCZOS))
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
        assert np.array_equal(frame, expected), "the 240×320 screen, resized whole"
        views = {}
        for name, action in (("left", LEFT), ("right", RIGHT), ("noop", NOOP)):
            env.reset(seed=3)
            for _ in range(60):  # strafing shifts the view slowly: 60 tics move it well apart
                frame, reward, terminated, _ = env.step(action)
                assert reward == 1.0 and not terminated, "+1 per tic alive"
            views[name] = frame.astype(int)
        assert np.abs(views["left"] - views["right"]).mean() > 5, "left and right move the view apart"
        assert np.abs(views["left"] - views["noop"]).mean() > 5
    finally:
        env.close()


def test_the_same_seed_gives_the_same_episode():
    env = make_env(compose_config("env=doom").env)

    def episode(seed: int) -> list[np.ndarray]:
        frames, done = [env.reset(seed=seed)], False
        while not done and len(frames) < 2100:
            frame, _, terminated, truncated = env.step(NOOP)
            frames.append(frame)
            done = terminated or truncated
        return frames

    try:
        first, again, other = episode(5), episode(5), episode(6)
        assert len(first) < 2100, "a player who stands still dies"
        assert len(first) == len(again) and all(np.array_equal(a, b) for a, b in zip(first, again))
        assert len(other) != len(first) or any(not np.array_equal(a, b) for a, b in zip(first, other))
    finally:
        env.close()


def test_the_paper_s_controller_reads_z_h_and_c():
    c = Controller(4, 3, action_dim=3, inputs="zhc", discrete=True)
    assert c.in_dim == 4 + 3 + 3 and c.n_params == 10 * 2 + 2
    params = torch.zeros(1, c.n_params)
    params[0, 2 * 7] = 1.0  # c[0] → the logit of action 1 (left)
    z, h = torch.zeros(1, 4), torch.zeros(1, 3)
    assert c.act(params, z, h, torch.tensor([[0.0, 0, 0]])).argmax().item() == 0
    assert c.act(params, z, h, torch.tensor([[2.0, 0, 0]])).argmax().item() == 1, "c moves the action"


def test_without_vizdoom_env_doom_is_one_line_before_any_run(tmp_path):
    """A missing extra, as a user without `make setup-doom` meets it (the module name stands in)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worldmodel",
            "stage=collect",
            "env=doom",
            f"paths.outputs={tmp_path}",
            "env.register=vizdoom_not_installed.gymnasium_wrapper",
        ],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "make setup-doom" in lines[0] and "vizdoom_not_installed" in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists(), "no store, no run"
    with pytest.raises(WorldModelError, match="needs vizdoom_not_installed"):
        make_env(compose_config("env=doom", "env.register=vizdoom_not_installed").env)


def test_doom_smoke_pipeline_trains_in_the_dream_and_leaves_no_engine(tmp_path):
    before = _engines()
    cfg = ("experiment=smoke", "env=doom", f"paths.outputs={tmp_path}", "collect.max_steps=60")
    with fresh_torch():  # the golden fingerprint was taken with a new process's torch settings
        parent = run_stage(compose_config(*cfg, "stage=pipeline"))
    tracking.setup(compose_config(*cfg))
    run = mlflow.get_run(parent)
    assert run.info.status == "FINISHED"
    assert mlflow.get_experiment(run.info.experiment_id).name == "VizdoomTakeCover-v1"
    children = children_of(parent)
    assert all(c.info.status == "FINISHED" for c in children.values()) and len(children) == 8
    with h5py.File(tracking.artifact_path(children["merge"].info.run_id, "dataset.h5"), "r") as f:
        assert f["images"].shape[2:] == (64, 64, 3) and f["images"].dtype == np.uint8
        assert set(np.unique(f["actions"][:].sum(-1))) == {1.0}, "one-hot actions"
        assert f.attrs["env_id"] == "VizdoomTakeCover-v1"
    evolve = children["evolve"]
    assert evolve.data.params["evolve.mode"] == "dream" and evolve.data.params["evolve.inputs"] == "zhc"
    controller = torch.load(tracking.artifact_path(evolve.info.run_id, "controller.pt"), weights_only=True)
    hp = controller["hparams"]
    assert hp["discrete"] and hp["action_dim"] == 3 and hp["inputs"] == "zhc"
    rnn = torch.load(
        tracking.artifact_path(children["train_rnn"].info.run_id, "checkpoints/best.pt"), weights_only=True
    )
    assert rnn["hparams"]["done_pos_weight"] == 10.0, "the paper's weighted done head"
    scores = children["evaluate"].data.metrics
    assert scores["eval/episodes"] == 3 and 1 <= scores["eval/score_min"] <= scores["eval/score_max"] <= 30
    assert _engines() <= before, "every VizDoom engine closed with its env"
    check_golden("doom", tmp_path, parent)  # what it computed before the refactor, bit for bit


def test_kill_9_of_the_stage_takes_its_workers_engines_with_it(tmp_path):
    """VizDoom's engine is a process of its own: a worker that goes takes it along (its process group)."""
    before = _engines()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worldmodel", "stage=collect", "env=doom", "collect.workers=2",
         "collect.episodes=8", f"paths.outputs={tmp_path}"],
        cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(_engines() - before) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_engines() - before) == 2, "both workers run an engine"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while _engines() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _engines() - before, "no engine outlives its worker"
