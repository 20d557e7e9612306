"""env=cartpole: the same stages, driven by the env config alone, on CartPole-v1 from pixels."""

from __future__ import annotations

import h5py
import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import children_of, compose_config
from tests.fingerprint import check_golden, fresh_torch
from worldmodel import tracking
from worldmodel.envs.pixels import make_env, widen
from worldmodel.models.controller import Controller
from worldmodel.stages import run_stage


def test_frames_show_the_cart_and_pole_anywhere_on_the_track():
    env = make_env(compose_config("env=cartpole").env)
    assert env.space.kind == "discrete" and env.space.dim == 2
    frames = [env.reset(seed=0, state=np.array([x, 0.0, 0.0, 0.0])) for x in (-1.2, 0.0, 1.2)]

    def cart_columns(frame: np.ndarray) -> np.ndarray:
        return np.flatnonzero((frame.min(axis=2) < 110).sum(axis=0) >= 3)  # the track line is 1 row

    for frame in frames:
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
        assert len(cart_columns(frame)) >= 3, "the cart is in the band"
    columns = [cart_columns(f).mean() for f in frames]
    assert columns[0] < 10 < columns[1] < 54 < columns[2], "left edge, centre, right edge"
    upright = env.reset(seed=0, state=np.zeros(4))
    tilted = env.reset(seed=0, state=np.array([0.0, 0.0, 0.2, 0.0]))
    assert np.abs(upright.astype(int) - tilted).sum() > 500, "the pole's angle shows in the frame"
    _, reward, terminated, _ = env.step(np.array([0.0, 1.0], np.float32))
    assert reward == 1.0 and not terminated


def test_widen_grows_dark_strokes_only():
    frame = np.full((8, 10, 3), 200, np.uint8)
    frame[2:6, 4] = 30  # a 1-column stroke
    wide = widen(frame, 1, 5)
    assert wide.shape == frame.shape and wide.dtype == np.uint8
    assert np.array_equal(np.flatnonzero(wide[3, :, 0] == 30), np.arange(2, 7)), "5 columns, centred"
    assert (wide[[0, 1, 6, 7]] == 200).all(), "rows untouched"
    assert widen(frame, 1, 1) is frame
    pole = make_env(compose_config("env=cartpole").env).reset(seed=0, state=np.zeros(4))
    narrow = make_env(compose_config("env=cartpole", "env.widen=null").env).reset(seed=0, state=np.zeros(4))
    dark = (pole.min(axis=2) < 200).sum(axis=1)[10], (narrow.min(axis=2) < 200).sum(axis=1)[10]
    assert dark[0] == dark[1] + 6, "the pole is 6 columns wider"


def test_the_discrete_controller_acts_by_argmax_one_hot():
    c = Controller(4, 3, action_dim=2, discrete=True)
    assert c.n_params == (4 + 3) * 1 + 1, "one logit: the first action's is fixed at 0"
    params = torch.zeros(3, c.n_params)
    params[0, -1] = 1.0  # bias: right
    params[1, -1] = -1.0  # left
    params[2, 0] = -1.0  # left when z[0] > 0, else right
    z = torch.tensor([[0.0] * 4, [0.0] * 4, [2.0, 0.0, 0.0, 0.0]])
    actions = c.act(params, z, torch.zeros(3, 3))
    assert torch.equal(actions, torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]))
    assert c.hparams["discrete"] is True


def test_cartpole_smoke_pipeline(tmp_path):
    cfg = ("experiment=smoke", "env=cartpole", f"paths.outputs={tmp_path}", "evolve.mode=real")
    with fresh_torch():  # the golden fingerprint was taken with a new process's torch settings
        parent = run_stage(compose_config(*cfg, "stage=pipeline"))
    tracking.setup(compose_config(*cfg))
    run = mlflow.get_run(parent)
    assert run.info.status == "FINISHED"
    assert mlflow.get_experiment(run.info.experiment_id).name == "CartPole-v1"
    children = children_of(parent)
    assert all(c.info.status == "FINISHED" for c in children.values()) and len(children) == 8
    assert children["collect"].data.tags["policy"] == "hold_random"
    dataset = tracking.artifact_path(children["merge"].info.run_id, "dataset.h5")
    with h5py.File(dataset, "r") as f:
        actions = f["actions"][:]
        assert actions.shape[-1] == 2 and set(np.unique(actions.sum(-1))) == {1.0}, "one-hot actions"
        assert f.attrs["env_id"] == "CartPole-v1" and f.attrs["crop"] == "144,64,140,140"
    controller = torch.load(
        tracking.artifact_path(children["evolve"].info.run_id, "controller.pt"), weights_only=True
    )
    assert controller["hparams"]["discrete"] is True and controller["hparams"]["action_dim"] == 2
    hp = controller["hparams"]
    assert len(hp["input_mean"]) == len(hp["input_std"]) == hp["latent"] + hp["hidden"], "normalize"
    assert min(hp["input_std"]) > 0
    assert children["evolve"].data.metrics["normalize/steps"] >= 16, "calibration rollouts ran"
    scores = children["evaluate"].data.metrics
    assert 1 <= scores["eval/score_min"] <= scores["eval/score_max"] <= 500
    gifs = {a.path for a in MlflowClient().list_artifacts(children["dream"].info.run_id, "gifs")}
    assert gifs
    check_golden("cartpole", tmp_path, parent)  # what it computed before the refactor, bit for bit
