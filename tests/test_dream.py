"""What makes a dream trainable: the dream-fidelity check, probes, the brake's clip, agent.z, the
terminal reward of a dreamed done, and data of C's own kind (policy=linear_random)."""

from __future__ import annotations

import csv
import math

import h5py
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from worldmodel import tracking
from worldmodel.control import fidelity
from worldmodel.control.agent import Agent
from worldmodel.control.dream import dream_rollouts, initial_latents
from worldmodel.errors import WorldModelError
from worldmodel.models.controller import Controller
from worldmodel.models.mdnrnn import MDNRNN
from worldmodel.models.vae import VAE
from worldmodel.stages import run_stage


def test_the_clipped_brake_starts_at_zero_where_the_affine_map_starts_at_half():
    x = torch.zeros(2, 4 + 3)
    params = torch.zeros(2, (4 + 3) * 3 + 3)
    affine, clipped = Controller(4, 3), Controller(4, 3, clip=[2])
    assert affine.act(params, x[:, :4], x[:, 4:])[0].tolist() == [0.0, 0.5, 0.5]
    assert clipped.act(params, x[:, :4], x[:, 4:])[0].tolist() == [0.0, 0.5, 0.0]
    params[1, -1] = -3.0  # a negative brake output clips to no brake at all
    assert clipped.act(params, x[:, :4], x[:, 4:])[1, 2] == 0.0
    assert clipped.hparams["clip"] == [2] and Controller(**clipped.hparams).clip == [2]
    with pytest.raises(ValueError, match="clip"):
        Controller(4, 3, clip=[3])


@pytest.mark.parametrize("clip", [[], [2]])
def test_probes_act_their_constant_action(clip):
    controller = Controller(4, 3, clip=clip, input_mean=[0.5] * 7, input_std=[2.0] * 7)
    z, h = torch.randn(5, 4), torch.randn(5, 3)
    for name, action in fidelity.BOX_PROBES.items():
        params = torch.from_numpy(fidelity.constant_params(controller, action)).expand(5, -1)
        got = controller.act(params, z, h)
        torch.testing.assert_close(got, torch.tensor([action] * 5), atol=1e-3, rtol=0, msg=name)
    discrete = Controller(4, 3, action_dim=3, discrete=True)
    for k, params in enumerate(fidelity.probes(discrete).values()):
        assert discrete.act(torch.from_numpy(params)[None], z[:1], h[:1])[0].argmax() == k
    axis = Controller(4, 3, action_dim=3, discrete=True, axis=[1, 0, 2])
    for k, params in enumerate(fidelity.probes(axis).values()):
        assert axis.act(torch.from_numpy(params).expand(5, -1), z, h).argmax(-1).eq(k).all()
    assert fidelity.probes(Controller(4, 3, action_dim=3, discrete=True, axis=[1, 0, 2], bias=False)) == {}


def test_spearman_ranks_with_ties():
    assert fidelity.spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert fidelity.spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    assert fidelity.ranks(np.array([5.0, 1.0, 5.0])).tolist() == [2.5, 1.0, 2.5]
    assert np.isnan(fidelity.spearman(np.array([1, 2, 3]), np.array([7, 7, 7])))


def test_a_dreamed_done_earns_the_terminal_reward_once():
    torch.manual_seed(0)
    rnn = MDNRNN(8, 3, hidden=16, mixtures=2).eval()
    with torch.no_grad():
        rnn.head.bias[-1] = 5.0  # P(done) ≈ 0.99: the first step ends every dream
    controller = Controller(8, 16)
    params, seeds = torch.zeros(3, controller.n_params), [0, 1, 2]
    z0 = initial_latents(None, None, seeds, 8)
    free, _ = dream_rollouts(rnn, controller, params, z0, seeds, 50, 1.0)
    paid, _ = dream_rollouts(rnn, controller, params, z0, seeds, 50, 1.0, done_reward=-100.0)
    torch.testing.assert_close(paid, free - 100.0)


def test_the_done_threshold_is_on_the_unweighted_probability():
    """The paper's Doom rule, logit > 0 at done weight 10, is P(done) > 1/11 once the weight is out."""
    rnn = MDNRNN(8, 3, hidden=16, mixtures=2, done_pos_weight=10.0).eval()
    with torch.no_grad():
        rnn.head.weight[-1].zero_()
        rnn.head.bias[-1] = math.log(10.0) + math.log(0.2 / 0.8)  # weighted logit of P(done) = 0.2
        rnn.head.weight[-2].zero_()
        rnn.head.bias[-2] = 1.0  # a reward of 1 per step
    controller = Controller(8, 16)
    params, seeds = torch.zeros(2, controller.n_params), [0, 1]
    z0 = initial_latents(None, None, seeds, 8)
    lasts, _ = dream_rollouts(rnn, controller, params, z0, seeds, 30, 1.0)
    ends, _ = dream_rollouts(rnn, controller, params, z0, seeds, 30, 1.0, done_threshold=1 / 11)
    assert lasts.tolist() == [30.0, 30.0], "P = 0.2 is under the default threshold 0.5"
    assert ends.tolist() == [1.0, 1.0], "and over 1/11: the first step ends the dream"


def test_agent_samples_z_per_row_from_its_episode_seed():
    torch.manual_seed(0)
    vae, rnn, controller = VAE(8).eval(), MDNRNN(8, 3, hidden=16, mixtures=2).eval(), Controller(8, 16)
    controller.set_flat(torch.randn(controller.n_params))
    frames = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)

    def actions(z: str, seeds: list[int], rows=None) -> np.ndarray:
        agent = Agent(vae, rnn, controller, slots=3, z=z)
        agent.reset(seeds)
        return agent.act(frames if rows is None else frames[rows], rows)

    mean = actions("mean", [1, 2, 3])
    sampled = actions("sample", [1, 2, 3])
    assert not np.allclose(mean, sampled), "a sampled z is not the mean"
    np.testing.assert_array_equal(sampled, actions("sample", [1, 2, 3]))
    np.testing.assert_allclose(actions("sample", [9, 2, 3], rows=[1, 2]), sampled[1:], atol=1e-6)
    with pytest.raises(ValueError, match="z must be"):
        Agent(vae, rnn, controller, z="mode")


def test_fidelity_check_scores_probes_random_and_named_controllers(smoke, evolve_run, rnn_run):
    run_id = run_stage(
        smoke(
            "stage=dream",
            "dream.mode=fidelity",
            f"inputs.train_rnn={rnn_run}",  # by id: other tests add train_rnn runs to the session's store
            f"inputs.evolve={evolve_run}",
            "dream.fidelity_random=2",
        )
    )
    tracking.setup(smoke())
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["upstream.train_rnn"] == rnn_run
    assert run.data.tags["upstream.evolve.0"] == evolve_run
    m = run.data.metrics
    # six probes, two random, CMA-ES's mean after each of the run's 2 generations, the kept controller
    assert m["fidelity/controllers"] == 6 + 2 + 2 + 1
    assert -1 <= m["fidelity/spearman"] <= 1 or np.isnan(m["fidelity/spearman"])
    with open(tracking.artifact_path(run_id, "fidelity/controllers.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["controller"] for r in rows][:3] == ["idle", "gas", "gas+brake"]
    names = [r["controller"] for r in rows]
    assert names[-3:] == [
        f"evolve {evolve_run[:8]} gen 0",
        f"evolve {evolve_run[:8]} gen 1",
        f"evolve {evolve_run[:8]}",
    ]
    last, kept = rows[-2], rows[-1]  # the replayed history ends at the mean that evolve kept
    assert float(last["dream_mean"]) == pytest.approx(float(kept["dream_mean"]), abs=1e-4)
    assert all(np.isfinite(float(r["dream_mean"])) and np.isfinite(float(r["real_mean"])) for r in rows)
    gas, idle = (float(next(r for r in rows if r["controller"] == n)["real_mean"]) for n in ("gas", "idle"))
    assert gas > idle, "in the real env a car on full gas reaches tiles that a parked one does not"
    names = {a.path for a in MlflowClient().list_artifacts(run_id, "fidelity")}
    assert {"fidelity/dream_vs_real.png", "fidelity/controllers.csv", "fidelity/reward_blocks.csv"} <= names
    blocks = MlflowClient().get_metric_history(run_id, "fidelity/reward_mse")
    assert len(blocks) >= 1 and all(np.isfinite(b.value) for b in blocks)
    assert np.isfinite(m["fidelity/action_nll_gain"]) and np.isfinite(m["fidelity/action_reward_mse_gain"])


def test_action_sensitivity_is_zero_for_an_m_deaf_to_the_actions():
    from worldmodel.control.fidelity import action_sensitivity
    from worldmodel.models.mdnrnn import MDNRNN

    torch.manual_seed(0)
    rnn = MDNRNN(latent=4, action_dim=3, hidden=16, mixtures=2).eval()
    z, a, r = torch.randn(3, 20, 4), torch.rand(3, 20, 3), torch.randn(3, 20)
    heard = action_sensitivity(rnn, z, a, r)
    assert heard.nll_foreign != pytest.approx(heard.nll, abs=1e-6), "a random M reads the actions"
    with torch.no_grad():
        rnn.lstm.weight_ih_l0[:, 4:] = 0  # the columns that read the action
    deaf = action_sensitivity(rnn, z, a, r)
    assert deaf.nll_foreign == pytest.approx(deaf.nll, abs=1e-6)
    assert deaf.reward_mse_foreign == pytest.approx(deaf.reward_mse, abs=1e-6)


def test_linear_random_collects_cs_own_kind_of_actions(smoke, rnn_run):
    common = ("stage=collect", "policy=linear_random", f"policy.run_id={rnn_run}", "evolve.clip_actions=[2]")
    run_id = run_stage(smoke(*common, "collect.workers=1", "collect.episodes=2"))
    again = run_stage(smoke(*common, "collect.workers=2", "collect.episodes=2"))
    tracking.setup(smoke())
    run = mlflow.get_run(run_id)
    assert run.data.tags["upstream.train_rnn"] == rnn_run and run.data.tags["policy"] == "linear_random"
    read = []
    for rid in (run_id, again):
        with h5py.File(tracking.artifact_path(rid, "shards/shard_00000.h5"), "r") as f:
            read.append(f["actions"][:])
    actions = read[0]
    np.testing.assert_array_equal(actions, read[1], err_msg="the worker count changes nothing")
    assert actions.shape == (2, 40, 3) and actions.dtype == np.float32
    assert np.all(actions[..., 0] >= -1) and np.all(actions[..., 1:] >= 0) and np.all(actions <= 1)
    assert not np.allclose(actions[0], actions[1]), "each episode draws its own controller"
    assert np.any(actions[..., 2] == 0.0), "the brake is clipped at 0, as evolve.clip_actions says"


def test_agent_z_must_match_the_runs_it_reads(smoke, rnn_run, evolve_run):
    with pytest.raises(WorldModelError, match=r"agent.z.*agent.z=sample"):
        run_stage(smoke("stage=evaluate", "agent.z=mean", f"inputs.evolve={evolve_run}"))
    with pytest.raises(WorldModelError, match="config key 'agent.z'"):
        run_stage(smoke("stage=evolve", "agent.z=mode"))


@pytest.mark.gpu
def test_dream_mode_evolve_dreams_on_the_gpu_as_on_the_cpu(smoke, rnn_run):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    args = ("stage=evolve", f"inputs.train_rnn={rnn_run}", "evolve.eval_episodes=0")
    runs = [mlflow.get_run(run_stage(smoke(*args, f"device={d}"))) for d in ("cpu", "cuda")]
    cpu, gpu = (r.data.metrics["fitness/mean"] for r in runs)
    assert abs(cpu - gpu) < 1e-2 * max(1.0, abs(cpu)), "the same dreams, to float rounding"
