"""C and the dream: the controller, batched dreams, evolve (real and dream), the dream stage, the pipeline."""

import hashlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import h5py
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import children_of, in_order
from worldmodel import tracking
from worldmodel.config import PROJECT_ROOT
from worldmodel.control.agent import standardisation
from worldmodel.control.dream import dream_rollouts, initial_latents
from worldmodel.errors import WorldModelError
from worldmodel.models.checkpoints import load_module, save_checkpoint
from worldmodel.models.controller import Controller
from worldmodel.models.mdnrnn import MDNRNN
from worldmodel.parallel.local import WorkerPool
from worldmodel.stages import run_stage


def test_controller_parameter_count_and_action_bounds():
    assert Controller(32, 256).n_params == 867
    assert Controller(32, 256, inputs="z").n_params == 32 * 3 + 3
    assert Controller(32, 256, hidden_units=40).n_params == 288 * 40 + 40 + 40 * 3 + 3
    c = Controller(32, 256, hidden_units=40)
    params = torch.randn(64, c.n_params) * 10
    a = c.act(params, torch.randn(64, 32) * 5, torch.randn(64, 256))
    assert a.shape == (64, 3)
    assert a[:, 0].min() >= -1 and a[:, 0].max() <= 1 and a[:, 0].min() < -0.5 < 0.5 < a[:, 0].max()
    assert a[:, 1:].min() >= 0 and a[:, 1:].max() <= 1
    flat = torch.randn(c.n_params)
    c.set_flat(flat)
    assert torch.equal(c.get_flat(), flat)
    with pytest.raises(ValueError, match="parameters"):
        c.set_flat(torch.zeros(5))


def test_the_paper_s_doom_controller_one_tanh_output_in_three_bins_and_no_bias(tmp_path):
    c = Controller(4, 3, action_dim=3, inputs="zhc", discrete=True, axis=[1, 0, 2], bias=False)
    assert c.n_params == 10, "one output, no bias: the paper's 576 + 512 weights at z64, h512"
    params = torch.zeros(5, c.n_params)
    params[:, 0] = 1.0  # z[0] → the one output
    z = torch.tensor([[-3.0], [-0.3], [0.0], [0.3], [3.0]]) * torch.tensor([[1.0, 0, 0, 0]])
    h = torch.zeros(5, 3)
    chosen = c.act(params, z, h, h).argmax(-1).tolist()
    assert chosen == [1, 0, 0, 0, 2], "tanh < -1/3 is left, > 1/3 right, none between"
    assert (
        c.act(torch.randn(8, c.n_params), torch.zeros(8, 4), h[:1].expand(8, 3), h[:1].expand(8, 3))[:, 0]
        .eq(1)
        .all()
    ), "without a bias, zero inputs are the middle bin whatever the weights"
    save_checkpoint(tmp_path / "c.pt", c)
    again = load_module(Controller, tmp_path / "c.pt")
    assert again.hparams == c.hparams and torch.equal(again.get_flat(), c.get_flat())
    with pytest.raises(ValueError, match="axis"):
        Controller(4, 3, action_dim=3, discrete=True, axis=[0, 1])
    with_bias = Controller(4, 3, action_dim=3, discrete=True, axis=[1, 0, 2])
    assert with_bias.n_params == 8


@pytest.mark.parametrize("axis", ["[0,2]", "[0,1,1]", "[a,b,c]"])
def test_a_discrete_axis_that_orders_no_actions_fails_before_any_run(tmp_path, axis):
    from tests.conftest import compose_config

    cfg = compose_config(
        "stage=evolve", "env=doom", f"paths.outputs={tmp_path}", f"evolve.discrete_axis={axis}"
    )
    with pytest.raises(WorldModelError, match=r"evolve\.discrete_axis"):
        run_stage(cfg)
    assert not (tmp_path / "mlflow.db").exists(), "validation must come before any work"


def test_mirrored_asks_come_in_antithetic_pairs_and_need_an_even_popsize(tmp_path):
    from tests.conftest import compose_config
    from worldmodel.control.cma import new_es

    es = new_es(20, 8, 0.1, 3, mirrored=True)
    for _ in range(3):  # pairs around the mean in every generation, not only the first
        asks = np.asarray(es.ask())
        steps = asks - es.mean
        assert np.allclose(steps[0::2], -steps[1::2]) and not np.allclose(steps[0], steps[2])
        es.tell(list(asks), list(np.random.default_rng(0).normal(size=8)))
    plain = np.asarray(new_es(20, 8, 0.1, 3).ask())  # the mean starts at zero
    assert not np.allclose(plain[0], -plain[1])
    cfg = compose_config(
        "stage=evolve", f"paths.outputs={tmp_path}", "evolve.mirrored=true", "evolve.popsize=7"
    )
    with pytest.raises(WorldModelError, match=r"evolve\.popsize"):
        run_stage(cfg)
    assert not (tmp_path / "mlflow.db").exists(), "validation must come before any work"


def test_memory_sigma_shrinks_cma_s_first_steps_on_the_weights_from_h_alone(tmp_path):
    from tests.conftest import compose_config
    from worldmodel.control.cma import new_es

    c = Controller(32, 256)
    scales = c.step_scales(0.1).numpy()
    weights = scales[: 288 * 3].reshape(288, 3)  # (in, out): rows 0-31 read z, rows 32-287 read h
    assert (weights[:32] == 1).all() and (weights[32:] == 0.1).all() and (scales[288 * 3 :] == 1).all()
    assert (Controller(32, 256, inputs="z").step_scales(0.1) == 1).all()
    asks = np.asarray(new_es(c.n_params, 64, 0.1, 1, scales).ask())
    on_z, on_h = asks[:, :96].std(), asks[:, 96 : 288 * 3].std()
    assert 0.08 < on_z < 0.12 and 0.008 < on_h < 0.012
    same = np.asarray(new_es(c.n_params, 8, 0.1, 1, c.step_scales(1.0).numpy()).ask())
    assert np.array_equal(same, np.asarray(new_es(c.n_params, 8, 0.1, 1).ask()))  # 1: today's asks
    cfg = compose_config("stage=evolve", f"paths.outputs={tmp_path}", "evolve.memory_sigma=0")
    with pytest.raises(WorldModelError, match=r"evolve\.memory_sigma"):
        run_stage(cfg)
    assert not (tmp_path / "mlflow.db").exists(), "validation must come before any work"


def test_controller_standardises_its_inputs(tmp_path):
    c = Controller(2, 3, inputs="z", input_mean=[1.0, -1.0], input_std=[2.0, 0.5])
    params = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])  # steer = x0, gas = x1
    raw = torch.atanh(c.act(params, torch.tensor([[3.0, -0.75]]), None)[0, 0])
    assert torch.isclose(raw, torch.tensor(1.0)), "(3 - 1) / 2"
    save_checkpoint(tmp_path / "c.pt", c)
    again = load_module(Controller, tmp_path / "c.pt")
    assert again.input_mean == [1.0, -1.0] and again.input_std == [2.0, 0.5]
    with pytest.raises(ValueError, match="2 values"):
        Controller(2, 3, inputs="z", input_mean=[0.0], input_std=[1.0])


def test_a_checkpoint_of_another_model_or_layout_is_one_line(tmp_path):
    save_checkpoint(tmp_path / "m.pt", MDNRNN(8, 3, hidden=16))
    with pytest.raises(
        WorldModelError, match=r"m\.pt: not a Controller checkpoint .*re-run the stage"
    ) as err:
        load_module(Controller, tmp_path / "m.pt")
    assert "\n" not in str(err.value)
    old = Controller(4, 3, action_dim=2, discrete=True)
    state = {"flat": torch.zeros((4 + 3) * 2 + 2)}  # the two-logit layout of earlier discrete controllers
    torch.save({"state_dict": state, "hparams": old.hparams}, tmp_path / "c.pt")
    with pytest.raises(WorldModelError, match="size mismatch") as err:
        load_module(Controller, tmp_path / "c.pt")
    assert "\n" not in str(err.value)


def test_standardisation_from_a_tally():
    x = np.random.default_rng(0).normal([3.0, -1.0, 0.0], [2.0, 0.5, 0.0], (5000, 3))
    tally = np.concatenate([[len(x)], x.sum(0), (x * x).sum(0)])
    mean, std = standardisation(tally)
    assert np.allclose(mean, [3.0, -1.0, 0.0], atol=0.1) and np.allclose(std, [2.0, 0.5, 1e-2], atol=0.05)


def test_controller_batch_rows_match_single_rows():
    c = Controller(8, 16)
    params, z, h = torch.randn(5, c.n_params), torch.randn(5, 8), torch.randn(5, 16)
    batched = c.act(params, z, h)
    for i in range(5):
        c.set_flat(params[i])
        assert torch.allclose(c(z[i : i + 1], h[i : i + 1]), batched[i : i + 1], atol=1e-6)


def test_batched_dreams_equal_each_candidate_alone():
    torch.manual_seed(0)
    rnn = MDNRNN(8, 3, hidden=32, mixtures=3).eval()
    with torch.no_grad():
        rnn.head.bias[-1] = -3.0  # mostly alive, so the dreams run for a while
    controller = Controller(8, 32)
    candidates = torch.randn(4, controller.n_params) * 0.5
    seeds = [11, 12, 13]
    mu, logvar = np.random.default_rng(0).standard_normal((6, 8)), np.full((6, 8), -2.0)
    rows = seeds * 4
    together, _ = dream_rollouts(
        rnn,
        controller,
        candidates.repeat_interleave(3, 0),
        initial_latents(mu, logvar, rows),
        rows,
        max_steps=120,
        temperature=1.0,
    )
    for c in range(4):
        alone, _ = dream_rollouts(
            rnn,
            controller,
            candidates[c : c + 1].expand(3, -1),
            initial_latents(mu, logvar, seeds),
            seeds,
            max_steps=120,
            temperature=1.0,
        )
        np.testing.assert_allclose(together[3 * c : 3 * c + 3].numpy(), alone.numpy(), rtol=1e-4, atol=1e-4)
    assert together.std() > 0, "different candidates and seeds give different returns"


def _init(x):
    return x


def _square_or_hang(marker_dir, payload):
    if payload == 3:  # the first attempt at task 3 hangs; the re-run answers
        marker = os.path.join(marker_dir, "hung-once")
        if not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(3600)
    return payload * payload


def test_worker_pool_replaces_a_hung_worker(tmp_path):
    with WorkerPool(2, _init, (str(tmp_path),), _square_or_hang, timeout=4) as pool:
        assert in_order(pool, list(range(6))) == [0, 1, 4, 9, 16, 25]
        assert pool.replaced == 1


def _digest(blob, payload):
    return hashlib.sha256(blob).hexdigest(), payload


def test_worker_pool_sends_init_arguments_past_a_pipes_size_whole_and_refuses_unpicklable_ones_at_once():
    blob = np.random.default_rng(0).bytes(4 << 20)  # V and M's weights: megabytes
    sha = hashlib.sha256(blob).hexdigest()
    with WorkerPool(2, _init, (blob,), _digest, timeout=60) as pool:
        assert in_order(pool, [0, 1, 2]) == [(sha, 0), (sha, 1), (sha, 2)]
    before = set(mp.active_children())
    with pytest.raises(TypeError, match="pickle"):
        WorkerPool(2, _init, (threading.Lock(),), _digest, timeout=60)
    assert set(mp.active_children()) == before, "no worker started"


def test_workers_killed_before_they_read_their_init_arguments_do_not_hold_up_the_parents_exit():
    script = (
        "from tests.test_control import _digest, _init\n"
        "from worldmodel.parallel.local import WorkerPool\n"
        "pool = WorkerPool(2, _init, (bytes(4 << 20),), _digest, timeout=60)\n"
        "for proc, _ in pool.procs.values():\n"
        "    proc.kill()  # still importing torch: its 4 MB are unread in the queue's pipe\n"
        "pool.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_evolve_dream_run(smoke, evolve_run, rnn_run):
    tracking.setup(smoke())
    run = mlflow.get_run(evolve_run)
    assert run.info.status == "FINISHED" and run.data.tags["upstream.train_rnn"] == rnn_run
    assert run.data.tags["mode"] == "dream" and run.data.params["evolve.popsize"] == "4"
    client = MlflowClient()
    for key in (
        "fitness/best",
        "fitness/mean",
        "fitness/worst",
        "cma/sigma",
        "rollouts_per_s",
        "real/check_score",  # the controller kept (select=mean: CMA-ES's mean)
        "real/check_dream_score",
        "real/check_top_score",  # the generation's top candidate
        "real/check_top_dream_score",
    ):
        assert [m.step for m in client.get_metric_history(evolve_run, key)] == [0, 1], key
    m = run.data.metrics
    assert m["eval/episodes"] == 2 and np.isfinite(m["eval/score_mean"]) and m["eval/score_std"] >= 0
    names = {a.path for a in client.list_artifacts(evolve_run)}
    assert {"controller.pt", "scores.csv", "score_histogram.png", "cma"} <= names
    gif = Image.open(tracking.artifact_path(evolve_run, "gifs/best_track.gif"))
    assert gif.n_frames == 20 and gif.size == (2 * 64 * 3, 64 * 3), "real frame beside its reconstruction"
    ckpt = torch.load(tracking.artifact_path(evolve_run, "controller.pt"), weights_only=True)
    assert ckpt["hparams"]["inputs"] == "zh"
    assert ckpt["state_dict"]["flat"].numel() == (32 + 32) * 3 + 3  # z32 and the smoke LSTM's h32


def test_evolve_real_mode_survives_a_killed_worker(smoke, rnn_run):
    killed = []

    def kill_one_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            workers = [p for p in mp.active_children() if p.name.startswith("SpawnProcess")]
            if workers:
                time.sleep(1.5)  # let it start a rollout
                os.kill(workers[0].pid, signal.SIGKILL)
                killed.append(workers[0].pid)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    run_id = run_stage(
        smoke(
            "stage=evolve",
            "evolve.mode=real",
            "evolve.generations=1",
            "evolve.max_steps=150",
            "evolve.eval_episodes=0",
            f"inputs.train_rnn={rnn_run}",
        )
    )
    killer.join(timeout=5)
    assert killed, "a worker was killed during the run"
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["workers_replaced"] >= 1
    assert np.isfinite(run.data.metrics["fitness/best"])


def test_evolve_resume_continues_the_cma_state(smoke, rnn_run):
    common = (
        "stage=evolve",
        f"inputs.train_rnn={rnn_run}",
        "evolve.real_check_every=0",
        "evolve.eval_episodes=0",
    )
    straight = run_stage(smoke(*common, "evolve.generations=3"))
    first = run_stage(smoke(*common, "evolve.generations=2"))
    MlflowClient().set_terminated(first, "KILLED")
    resumed = run_stage(smoke(*common, "evolve.generations=3", f"inputs.resume={first}"))
    assert resumed == first
    client = MlflowClient()
    history = client.get_metric_history(first, "fitness/best")
    assert [m.step for m in history] == [0, 1, 2]
    expected = client.get_metric_history(straight, "fitness/best")
    np.testing.assert_allclose([m.value for m in history], [m.value for m in expected], rtol=1e-5)
    sigmas = [m.value for m in client.get_metric_history(first, "cma/sigma")]
    np.testing.assert_allclose(sigmas, [m.value for m in client.get_metric_history(straight, "cma/sigma")])


def test_dream_replay_gif_and_latent_error(smoke, evolve_run):
    run_id = run_stage(smoke("stage=dream", "dream.steps=12", "dream.episodes=1"))
    tracking.setup(smoke())
    gif = Image.open(tracking.artifact_path(run_id, "gifs/replay_000.gif"))
    assert gif.n_frames == 12 and gif.size == (3 * 64 * 3, 64 * 3), "real | reconstruction | dream"
    history = MlflowClient().get_metric_history(run_id, "replay/latent_mse")
    assert len(history) == 12 and history[0].value == 0.0, "the dream starts on the real latent"
    free = run_stage(smoke("stage=dream", "dream.mode=free", "dream.steps=10", "dream.episodes=2"))
    assert mlflow.get_run(free).data.tags["upstream.evolve"]
    frames = Image.open(tracking.artifact_path(free, "gifs/free_001.gif"))
    assert frames.size == (64 * 3, 64 * 3) and 1 <= frames.n_frames <= 10
    by_policy = run_stage(
        smoke("stage=dream", "dream.mode=free", "dream.use_controller=false", "dream.steps=10")
    )
    assert Image.open(tracking.artifact_path(by_policy, "gifs/free_000.gif")).n_frames == 10


def test_collect_with_an_evolved_controller(smoke, evolve_run):
    run_id = run_stage(
        smoke(
            "stage=collect",
            "policy=controller",
            f"policy.run_id={evolve_run}",
            "collect.workers=1",
            "collect.episodes=2",
        )
    )
    tracking.setup(smoke())
    run = mlflow.get_run(run_id)
    assert run.data.tags["upstream.evolve"] == evolve_run and run.data.tags["policy"] == "controller"
    with h5py.File(tracking.artifact_path(run_id, "shards/shard_00000.h5"), "r") as f:
        actions = f["actions"][:]
    assert actions.shape == (2, 40, 3)
    assert np.all(actions[..., 0] >= -1) and np.all(actions[..., 1:] >= 0) and np.all(actions <= 1)
    assert not np.allclose(actions[:, :20], [-0.1, 1.0, 0.0]), "not the pseudo-random warm-up"


def test_pipeline_parent_with_a_child_per_stage_and_a_round(smoke, tmp_path):
    parent = run_stage(
        smoke(
            "stage=pipeline",
            "mlflow.experiment=pipeline-test",
            "pipeline.rounds=1",
            "pipeline.round_episodes=2",
            "pipeline.round_random_episodes=1",
            "pipeline.round_noise=0.2",
            "pipeline.round_noise_steps=5",
            "pipeline.round_config={train_rnn: {seq_len: 10, dropout: 0.1}, agent: {z: mean}}",
        )
    )
    tracking.setup(smoke("mlflow.experiment=pipeline-test"))
    run = mlflow.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "pipeline"

    stages = children_of(parent)
    assert sorted(stages) == sorted(
        ["collect", "merge", "train_vae", "encode", "train_rnn", "evolve", "evaluate", "dream", "round"]
    )
    assert all(c.info.status == "FINISHED" and c.data.tags["pipeline"] == parent for c in stages.values())
    assert stages["merge"].data.tags["upstream.collect"] == stages["collect"].info.run_id
    assert stages["dream"].data.tags["upstream.train_rnn"] == stages["train_rnn"].info.run_id
    assert stages["evaluate"].data.tags["upstream.evolve"] == stages["evolve"].info.run_id
    for key in ("vae/val_loss", "rnn/val_nll", "rnn/baseline_nll", "evolve/best_fitness", "eval/score_mean"):
        assert np.isfinite(run.data.metrics[key]), key
    assert run.data.params["latent.size"] == "32"

    # The round: collect with the evolved controller and with random linear controllers on its M, merge
    # with the first data, same V, new M and C.
    round_run = stages["round"]
    assert round_run.data.tags["round"] == "1" and run.data.tags["child.round_1"] == round_run.info.run_id
    inner = children_of(round_run.info.run_id)
    collects = [
        c
        for c in MlflowClient().search_runs(
            [round_run.info.experiment_id], f"tags.mlflow.parentRunId = '{round_run.info.run_id}'"
        )
        if c.data.tags["stage"] == "collect"
    ]
    assert len(collects) == 2
    assert sorted(inner) == sorted(["collect", "merge", "encode", "train_rnn", "evolve", "evaluate"])
    controller = next(c for c in collects if c.data.tags["policy"] == "controller")
    linear = next(c for c in collects if c.data.tags["policy"] == "linear_random")
    assert controller.data.tags["upstream.evolve"] == stages["evolve"].info.run_id
    assert controller.data.params["policy.noise"] == "0.2", "pipeline.round_noise"
    assert controller.data.params["policy.noise_steps"] == "5", "pipeline.round_noise_steps"
    assert linear.data.tags["upstream.train_rnn"] == stages["train_rnn"].info.run_id, "the controller's M"
    assert round_run.data.tags["child.collect_linear_random"] == linear.info.run_id
    assert (
        linear.data.params["collect.episodes"] == "1"
        and linear.data.params["seed"] != controller.data.params["seed"]
    )
    merged = inner["merge"].data.tags["upstream.collect"].split(",")
    assert merged == [stages["collect"].info.run_id, controller.info.run_id, linear.info.run_id]
    assert inner["encode"].data.tags["upstream.train_vae"] == stages["train_vae"].info.run_id
    assert inner["evaluate"].data.tags["upstream.evolve"] == inner["evolve"].info.run_id
    # the rounds' own settings; the first pass keeps the common ones
    assert inner["train_rnn"].data.params["train_rnn.seq_len"] == "10"
    assert inner["train_rnn"].data.params["train_rnn.dropout"] == "0.1"
    assert inner["evolve"].data.params["agent.z"] == "mean"
    assert stages["train_rnn"].data.params["train_rnn.seq_len"] == "8"
    assert controller.data.params["policy.z"] == "sample", "the controller reads z as it was trained"
    with h5py.File(tracking.artifact_path(inner["merge"].info.run_id, "dataset.h5"), "r") as f:
        assert f["images"].shape[0] == 4 + 2 + 1, "every episode so far"
    assert run.data.metrics["eval/score_mean"] == inner["evaluate"].data.metrics["eval/score_mean"]


def test_pipeline_stage_range_is_validated(smoke):
    from worldmodel.errors import WorldModelError

    with pytest.raises(WorldModelError, match="pipeline.stages"):
        run_stage(smoke("stage=pipeline", "pipeline.stages=[dream,collect]"))


def test_pipeline_round_config_is_validated_before_any_work(smoke):
    from worldmodel.errors import WorldModelError

    rounds = ("stage=pipeline", "pipeline.rounds=1")
    with pytest.raises(WorldModelError, match="evolve.mode"):
        run_stage(smoke(*rounds, "pipeline.round_config={evolve: {mode: drem}}"))
    with pytest.raises(WorldModelError, match="pipeline.round_config"):
        run_stage(smoke(*rounds, "pipeline.round_config={inputs: {evolve: x}}"))
    with pytest.raises(WorldModelError, match="pipeline.round_random_episodes"):
        run_stage(smoke(*rounds, "pipeline.round_random_episodes=-1"))


def test_a_noisy_controller_drifts_off_its_line_the_same_way_with_any_worker_count(smoke, evolve_run):
    """policy.noise: the controller's action plus a correlated offset, clipped to the box, seeded per
    episode (so the worker count changes nothing)."""
    common = ("stage=collect", "policy=controller", f"policy.run_id={evolve_run}", "collect.episodes=2")
    plain = run_stage(smoke(*common, "collect.workers=1"))
    noisy = [run_stage(smoke(*common, "policy.noise=[0.3,0.3,0.1]", f"collect.workers={w}")) for w in (1, 2)]
    tracking.setup(smoke())
    read = []
    for rid in (plain, *noisy):
        with h5py.File(tracking.artifact_path(rid, "shards/shard_00000.h5"), "r") as f:
            read.append(f["actions"][:])
    clean, drifted, again = read
    np.testing.assert_array_equal(drifted, again, err_msg="the worker count changes nothing")
    assert np.all(drifted[..., 0] >= -1) and np.all(drifted[..., 1:] >= 0) and np.all(drifted <= 1)
    offset = (drifted - clean)[..., :2].reshape(2, 40, 2)  # gas and steering; the brake is mostly clipped
    lag1 = np.corrcoef(offset[:, 1:].ravel(), offset[:, :-1].ravel())[0, 1]
    assert np.abs(offset).mean() > 0.05 and lag1 > 0.5, "a drift that lasts, not jitter"
    with pytest.raises(WorldModelError, match="policy.noise"):
        run_stage(smoke(*common, "policy.noise=-0.1"))
    runs = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    with pytest.raises(WorldModelError, match="'policy.noise' must be 0 for discrete"):
        run_stage(smoke(*common, "env=cartpole", "policy.noise=0.2"))
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs, "no new run"
