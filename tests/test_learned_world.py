"""train_vae → encode → train_rnn on experiment=smoke: tracking, lineage, checkpoints, bad inputs."""

import json

import h5py
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from worldmodel import tracking
from worldmodel.errors import WorldModelError
from worldmodel.models.mdnrnn import MDNRNN
from worldmodel.models.vae import VAE
from worldmodel.stages import run_stage


def artifacts(run_id, path=""):
    return {a.path for a in MlflowClient().list_artifacts(run_id, path)}


def test_train_vae_run(smoke, vae_run, merge_run):
    tracking.setup(smoke())
    run = mlflow.get_run(vae_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags["upstream.merge"] == merge_run and run.data.tags["latent_size"] == "32"
    assert run.data.params["train_vae.epochs"] == "2" and run.data.params["latent.size"] == "32"
    history = MlflowClient().get_metric_history(vae_run, "val/loss")
    assert [m.step for m in history] == [0, 1]
    for key in ("train/loss", "train/recon", "train/kl", "val/recon", "val/kl", "train/frames_per_s"):
        assert key in run.data.metrics
    assert {"checkpoints/best.pt", "checkpoints/last.pt"} <= artifacts(vae_run, "checkpoints")
    from worldmodel.stages import headline

    assert headline("train_vae", vae_run) == run.data.metrics["best_val_loss"]  # what the app returns
    kind = mlflow.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development", "the 3.x UI asks no type"
    (used,) = run.inputs.dataset_inputs  # the run page lists it under Datasets
    assert used.dataset.name == f"dataset.h5@{merge_run[:8]}"
    assert json.loads(used.dataset.source)["uri"].endswith(f"{merge_run}/artifacts/dataset.h5")
    assert {t.key: t.value for t in used.tags}["producer_run"] == merge_run
    series = sorted(a for a in artifacts(vae_run, "images") if a.endswith(".png"))
    assert [a.split("+step+")[1].split("+")[0] for a in series] == ["0", "1"], "one image per epoch, by step"
    assert all(a.startswith("images/reconstructions+step+") for a in series)
    assert "model/data/model.pt2" in {a.path for a in MlflowClient().list_artifacts(vae_run, "model/data")}, (
        "logged as a torch.export program, not a pickle"
    )


def test_train_vae_in_bf16_and_channels_last_learns_like_fp32(smoke, merge_run, vae_run):
    """The GPU options (autocast bf16, NHWC convolutions) on the same data and seed: the training loss
    falls and the validation loss, computed in fp32, stays near the fp32 run's."""
    fast = run_stage(
        smoke(
            "stage=train_vae",
            f"inputs.merge={merge_run}",
            "train_vae.precision=bf16",
            "train_vae.channels_last=true",
        )
    )
    tracking.setup(smoke())
    client = MlflowClient()
    loss = [m.value for m in client.get_metric_history(fast, "train/loss")]
    assert loss[-1] < loss[0] and np.isfinite(loss).all()
    val, ref = (client.get_run(r).data.metrics["val/loss"] for r in (fast, vae_run))
    assert abs(val - ref) < 0.02 * ref, (val, ref)
    assert client.get_run(fast).data.params["train_vae.precision"] == "bf16"
    with pytest.raises(WorldModelError, match="train_vae.precision"):
        run_stage(smoke("stage=train_vae", f"inputs.merge={merge_run}", "train_vae.precision=fp16"))


def test_checkpoints_reload_with_weights_only_and_give_identical_outputs(smoke, vae_run, rnn_run):
    tracking.setup(smoke())
    ckpt = torch.load(tracking.artifact_path(vae_run, "checkpoints/best.pt"), weights_only=True)
    vae = VAE(**ckpt["hparams"])
    vae.load_state_dict(ckpt["state_dict"])
    logged = mlflow.pytorch.load_model(f"runs:/{vae_run}/model")  # pt2: no pickle
    x = torch.rand(5, 3, 64, 64)  # another batch size than the export's example
    _, mu, logvar = logged(x)
    torch.testing.assert_close((mu, logvar), vae.encode(x))

    rnn_ckpt = tracking.checkpoint_of(rnn_run, "best")
    rnn, again = MDNRNN(**rnn_ckpt["hparams"]), MDNRNN(**rnn_ckpt["hparams"])
    rnn.load_state_dict(rnn_ckpt["state_dict"])
    again.load_state_dict(
        torch.load(tracking.artifact_path(rnn_run, "checkpoints/best.pt"), weights_only=True)["state_dict"]
    )
    z, a = torch.randn(1, 4, 32), torch.rand(1, 4, 3)
    assert torch.equal(rnn(z, a)[0].mixture.mu, again(z, a)[0].mixture.mu)
    logged_rnn = mlflow.pytorch.load_model(f"runs:/{rnn_run}/model")
    h, c = rnn.initial_state(3)
    z, a = torch.randn(3, 32), torch.rand(3, 3)
    out, (h1, c1) = rnn.step(z, a, (h, c))
    log_pi, mu, log_sigma, reward, done, h2, c2 = logged_rnn(z, a, h[0], c[0])
    torch.testing.assert_close((mu, reward, h2, c2), (out.mixture.mu, out.reward, h1[0], c1[0]))


def test_encode_output_and_lineage(smoke, encode_run, vae_run, merge_run, dataset_path):
    tracking.setup(smoke())
    run = mlflow.get_run(encode_run)
    assert run.data.tags["upstream.train_vae"] == vae_run and run.data.tags["upstream.merge"] == merge_run
    assert run.data.metrics["frames"] == 160
    with (
        h5py.File(tracking.artifact_path(encode_run, "latents.h5"), "r") as f,
        h5py.File(dataset_path, "r") as d,
    ):
        assert f["mu"].shape == f["logvar"].shape == (4, 40, 32) and f["mu"].dtype == np.float32
        np.testing.assert_array_equal(f["actions"][:], d["actions"][:])
        np.testing.assert_array_equal(f["dones"][:], d["dones"][:])
        np.testing.assert_array_equal(f["split/val"][:], d["split/val"][:])
        assert f.attrs["vae_run"] == vae_run and f.attrs["merge_run"] == merge_run
        vae = VAE(32, 64)
        vae.load_state_dict(tracking.checkpoint_of(vae_run)["state_dict"])
        with torch.no_grad():
            mu, _ = vae.encode(torch.from_numpy(d["images"][1, :5]).permute(0, 3, 1, 2).float() / 255)
        np.testing.assert_allclose(f["mu"][1, :5], mu.numpy(), atol=1e-4)


def test_train_rnn_run_logs_the_baseline(smoke, rnn_run, encode_run):
    tracking.setup(smoke())
    run = mlflow.get_run(rnn_run)
    assert run.info.status == "FINISHED" and run.data.tags["upstream.encode"] == encode_run
    m = run.data.metrics
    for key in ("train/nll", "val/nll", "val/reward_loss", "val/done_loss", "val/baseline_nll"):
        assert np.isfinite(m[key]), key
    assert run.data.params["train_rnn.mixtures"] == "3"
    assert "checkpoints/best.pt" in artifacts(rnn_run, "checkpoints")
    assert "model/data/model.pt2" in {a.path for a in MlflowClient().list_artifacts(rnn_run, "model/data")}


def test_latent_size_mismatch_is_one_line(smoke, vae_run):
    with pytest.raises(WorldModelError, match="latent_size=32") as err:
        run_stage(smoke("stage=encode", "latent=z16", f"inputs.train_vae={vae_run}"))
    assert "\n" not in str(err.value)
    with pytest.raises(WorldModelError, match="no FINISHED encode run with env=CarRacing-v3, latent_size=64"):
        run_stage(smoke("stage=train_rnn", "latent=z64"))


def test_image_size_mismatch_is_one_line(smoke, vae_run):
    small = run_stage(smoke("stage=collect", "env.image_size=96", "collect.episodes=2", "collect.workers=1"))
    merged = run_stage(smoke("stage=merge", "env.image_size=96", f"inputs.collect={small}"))
    with pytest.raises(WorldModelError, match="96px frames but VAE run .* takes 64px"):
        run_stage(smoke("stage=encode", f"inputs.train_vae={vae_run}", f"inputs.merge={merged}"))
    with pytest.raises(WorldModelError, match="env.image_size"):
        run_stage(smoke("stage=train_vae", "env.image_size=50"))


def test_train_vae_resumes_from_its_last_epoch(smoke, merge_run):
    first = run_stage(smoke("stage=train_vae", f"inputs.merge={merge_run}", "train_vae.epochs=1"))
    MlflowClient().set_terminated(first, "KILLED")  # as if stopped after its first epoch
    resumed = run_stage(smoke("stage=train_vae", f"inputs.merge={merge_run}", f"inputs.resume={first}"))
    assert resumed == first
    steps = [m.step for m in MlflowClient().get_metric_history(first, "val/loss")]
    assert steps == [0, 1], "epoch 0 is not trained again"
    assert mlflow.get_run(first).info.status == "FINISHED"
    with pytest.raises(WorldModelError, match="train_vae.lr"):
        killed = run_stage(smoke("stage=train_vae", f"inputs.merge={merge_run}", "train_vae.epochs=1"))
        MlflowClient().set_terminated(killed, "KILLED")
        run_stage(smoke("stage=train_vae", f"inputs.resume={killed}", "train_vae.lr=0.1"))


def test_train_rnn_resumes_from_its_last_epoch(smoke, encode_run):
    first = run_stage(smoke("stage=train_rnn", f"inputs.encode={encode_run}", "train_rnn.epochs=1"))
    MlflowClient().set_terminated(first, "FAILED")
    straight = run_stage(smoke("stage=train_rnn", f"inputs.encode={encode_run}"))
    resumed = run_stage(smoke("stage=train_rnn", f"inputs.encode={encode_run}", f"inputs.resume={first}"))
    assert resumed == first
    history = MlflowClient().get_metric_history(first, "val/nll")
    assert [m.step for m in history] == [0, 1]
    expected = MlflowClient().get_metric_history(straight, "val/nll")
    np.testing.assert_allclose([m.value for m in history], [m.value for m in expected], rtol=1e-5)
