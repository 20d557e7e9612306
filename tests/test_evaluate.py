"""The standard evaluation, lockstep real-env rollouts with stall stopping, and the dream's options."""

import csv

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from worldmodel import tracking
from worldmodel.config import CONFIG_DIR
from worldmodel.control.agent import Agent, play, worker_inference
from worldmodel.control.dream import dream_rollouts, initial_latents
from worldmodel.envs.pixels import make_env
from worldmodel.errors import WorldModelError
from worldmodel.models.controller import Controller
from worldmodel.models.mdnrnn import MDNRNN, mdn_loss
from worldmodel.models.vae import VAE
from worldmodel.seeds import EVAL, TRAIN, seed_of
from worldmodel.stages import run_stage

ENV = OmegaConf.load(CONFIG_DIR / "env" / "carracing.yaml")


def _agent(slots: int) -> Agent:
    torch.manual_seed(0)
    return Agent(VAE(8).eval(), MDNRNN(8, hidden=16).eval(), Controller(8, 16), slots)


def test_lockstep_play_is_deterministic_and_stops_stalled_rollouts():
    worker_inference()
    agent = _agent(3)
    params = np.random.default_rng(0).standard_normal((3, agent.controller.n_params)).astype(np.float32)
    params[1] = 0.0
    params[1, -2:] = [-10.0, 10.0]  # biases: no gas, full brake: the car never reaches a new tile
    envs = [make_env(ENV) for _ in range(3)]
    agent.set_params(params)
    first = play(envs, agent, [5, 6, 7], 120, stall_steps=30, record=4)
    agent.set_params(params)
    again = play(envs, agent, [5, 6, 7], 120, stall_steps=30)
    assert [r.score for r in first] == [r.score for r in again]
    # The first step reaches the start tile (+1000/N); 30 steps without another end the rollout.
    assert first[1].stalled and first[1].steps == 31 and first[1].score > 0
    assert all(r.steps <= 120 for r in first)
    assert len(first[0].frames) == 4 and first[0].frames[0].shape == (64, 128, 3), "real | reconstruction"
    agent.set_params(params)
    unstopped = play(envs, agent, [5, 6, 7], 120, stall_steps=0)
    assert unstopped[1].steps == 120 and not unstopped[1].stalled, "stall_steps=0 never cuts an episode"
    # each rollout tallies what its controller read, one row per step: [count, Σx, Σx²]
    dim = agent.controller.in_dim
    assert all(r.inputs.shape == (1 + 2 * dim,) and r.inputs[0] == r.steps for r in first)
    assert (first[0].inputs[1 + dim :] >= 0).all() and not np.allclose(first[0].inputs, first[2].inputs)


def test_evaluation_seeds_never_overlap_training_seeds():
    train = {seed_of(0, TRAIN, g, r) for g in range(300) for r in range(16)}
    evaluation = {seed_of(0, EVAL, i) for i in range(1000)}
    assert not train & evaluation and len(evaluation) == 1000


def test_evaluate_stage_logs_scores_histogram_and_gifs(smoke, evolve_run):
    run_id = run_stage(smoke("stage=evaluate", f"inputs.evolve={evolve_run}"))
    tracking.setup(smoke())
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "evaluate"
    assert run.data.tags["upstream.evolve"] == evolve_run
    m = run.data.metrics
    assert m["eval/episodes"] == 3
    assert m["eval/score_min"] <= m["eval/score_median"] <= m["eval/score_max"]
    with open(tracking.artifact_path(run_id, "scores.csv")) as f:
        rows = list(csv.DictReader(f))
    scores = np.array([float(r["score"]) for r in rows])
    assert [int(r["seed"]) for r in rows] == [seed_of(0, EVAL, i) for i in range(3)]
    np.testing.assert_allclose(scores.mean(), m["eval/score_mean"], atol=1e-2)
    assert all(int(r["steps"]) == 30 for r in rows), "evaluation episodes are never cut short"
    assert Image.open(tracking.artifact_path(run_id, "score_histogram.png")).format == "PNG"
    for name in ("best_track", "worst_track"):
        gif = Image.open(tracking.artifact_path(run_id, f"gifs/{name}.gif"))
        assert gif.n_frames == 10 and gif.size == (2 * 64 * 3, 64 * 3)
    names = {a.path for a in MlflowClient().list_artifacts(run_id, "gifs")}
    assert not any("partial" in n for n in names)

    # The same seeds give the same scores whatever the worker count; GIFs longer than the scored
    # episodes stop where they stopped.
    one = run_stage(
        smoke("stage=evaluate", f"inputs.evolve={evolve_run}", "evaluate.workers=1", "evaluate.gif_steps=50")
    )
    with open(tracking.artifact_path(one, "scores.csv")) as f:
        assert [float(r["score"]) for r in csv.DictReader(f)] == list(scores)
    assert Image.open(tracking.artifact_path(one, "gifs/best_track.gif")).n_frames == 30


def test_evaluate_refuses_a_run_that_is_not_an_evolve_run(smoke, rnn_run):
    with pytest.raises(WorldModelError, match="not a evolve run|not an evolve run"):
        run_stage(smoke("stage=evaluate", f"inputs.evolve={rnn_run}"))


def test_evaluate_config_is_validated_before_any_work(smoke):
    with pytest.raises(WorldModelError, match="evaluate.episodes"):
        run_stage(smoke("stage=evaluate", "evaluate.episodes=0"))
    with pytest.raises(WorldModelError, match="evolve.dream_done"):
        run_stage(smoke("stage=evolve", "evolve.dream_done=maybe"))
    with pytest.raises(WorldModelError, match="train_rnn.dropout"):
        run_stage(smoke("stage=train_rnn", "train_rnn.dropout=1.5"))


def test_real_mode_evolve_logs_stalls(smoke, rnn_run):
    run_id = run_stage(
        smoke(
            "stage=evolve",
            "evolve.mode=real",
            "evolve.generations=1",
            "evolve.max_steps=60",
            "evolve.stall_steps=20",
            "evolve.eval_episodes=0",
            f"inputs.train_rnn={rnn_run}",
        )
    )
    m = mlflow.get_run(run_id).data.metrics
    assert 0 <= m["rollouts/stalled_fraction"] <= 1
    assert 20 <= m["rollouts/steps_mean"] <= 60
    assert m["rollouts/env_steps"] == pytest.approx(m["rollouts/steps_mean"] * 4 * 2)


# ---- the dream's options ---------------------------------------------------------------------------


def _world():
    torch.manual_seed(0)
    rnn = MDNRNN(8, 3, hidden=32, mixtures=3, dropout=0.05).eval()
    with torch.no_grad():
        rnn.head.bias[-1] = -2.0  # P(done) ≈ 0.12 a step: thresholded never ends, sampled does
    return rnn, Controller(8, 32)


def test_dream_dropout_gives_each_rollout_its_own_fixed_world():
    rnn, controller = _world()
    params = torch.randn(1, controller.n_params).expand(4, -1) * 0.5
    seeds = [1, 2, 3, 1]
    z0 = initial_latents(None, None, seeds, 8)
    plain, _ = dream_rollouts(rnn, controller, params, z0, seeds, 40, 1.0)
    masked, _ = dream_rollouts(rnn, controller, params, z0, seeds, 40, 1.0, dropout=0.3)
    assert not torch.allclose(plain, masked), "dropout changes the world"
    assert masked[0] == masked[3], "the mask comes from the rollout's own seed"
    alone, _ = dream_rollouts(rnn, controller, params[:1], z0[:1], seeds[:1], 40, 1.0, dropout=0.3)
    torch.testing.assert_close(alone[0], masked[0], rtol=1e-4, atol=1e-4)


def test_sampled_done_ends_dreams_that_a_threshold_never_ends():
    rnn, controller = _world()
    params = torch.zeros(16, controller.n_params)
    seeds = list(range(16))
    z0 = initial_latents(None, None, seeds, 8)
    _, kept = dream_rollouts(rnn, controller, params, z0, seeds, 60, 1.0, record=True)
    assert kept.shape[0] == 60, "P(done) < 0.5: a threshold never ends the dream"
    total, _ = dream_rollouts(rnn, controller, params, z0, seeds, 60, 1.0, sample_done=True)
    full, _ = dream_rollouts(rnn, controller, params, z0, seeds, 60, 1.0)
    assert (total != full).any(), "sampled dones end some dreams early"


def test_initial_z_from_the_prior():
    z = initial_latents(None, None, list(range(2000)), 8)
    assert z.shape == (2000, 8)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    assert torch.equal(z[:3], initial_latents(None, None, [0, 1, 2], 8))


def test_variational_dropout_holds_one_mask_per_sequence_on_z_and_the_recurrent_h():
    torch.manual_seed(0)
    rnn = MDNRNN(4, 3, hidden=8, mixtures=2, dropout=0.5).train()
    z, a = torch.randn(2, 6, 4), torch.rand(2, 6, 3)
    ones = (torch.ones(2, 4), torch.ones(2, 8))
    torch.testing.assert_close(rnn(z, a, masks=ones)[0].reward, rnn(z, a)[0].reward, rtol=1e-5, atol=1e-6)
    masks = rnn.dropout_masks(2, 0.5, torch.Generator().manual_seed(1))
    assert masks[0].shape == (2, 4) and masks[1].shape == (2, 8)
    assert set(masks[0].unique().tolist()) <= {0.0, 2.0}, "kept units are scaled by 1 / (1 - p)"
    dropped = rnn(z, a, masks=masks)[0].reward
    assert not torch.allclose(dropped, rnn(z, a)[0].reward), "the masks change the world"
    # a dropped z dimension is dropped at every step: changing it changes nothing
    masks = (torch.tensor([[0.0, 2, 2, 2]] * 2), torch.full((2, 8), 2.0))
    other = z.clone()
    other[..., 0] += 5
    torch.testing.assert_close(rnn(z, a, masks=masks)[0].reward, rnn(other, a, masks=masks)[0].reward)
    # one step at a time, as a dream runs it, gives what the sequence gives
    state, steps = rnn.initial_state(2), []
    for t in range(6):
        out, state = rnn.step(z[:, t], a[:, t], state, masks)
        steps.append(out.reward)
    torch.testing.assert_close(torch.stack(steps, 1), rnn(z, a, masks=masks)[0].reward, rtol=1e-5, atol=1e-6)


def test_a_reset_starts_the_memory_afresh_as_a_new_life_does():
    """train_rnn.reset_on_done: after a done inside a record (a death, then the next life), M's memory
    starts from zero, as the paper's restart flag, so every life is what a dream or a real episode sees."""
    from worldmodel.stages.train_rnn import resets

    torch.manual_seed(0)
    rnn = MDNRNN(4, 3, hidden=8, mixtures=2)
    z, a = torch.randn(2, 7, 4), torch.rand(2, 7, 3)
    dones = torch.zeros(2, 7, dtype=torch.bool)
    dones[0, 2] = True  # row 0: a life of 3 steps, then a new one from step 3
    fresh = resets(dones)
    assert fresh[0].tolist() == [False, False, False, True, False, False, False] and not fresh[1].any()
    out, h, _ = rnn(z, a, resets=fresh)
    _, alone, _ = rnn(z[:1, 3:], a[:1, 3:])
    torch.testing.assert_close(h[0, 3:], alone[0], rtol=1e-5, atol=1e-6)
    _, whole, _ = rnn(z, a)
    torch.testing.assert_close(h[1], whole[1], rtol=1e-5, atol=1e-6)  # no done, no reset
    assert not torch.allclose(h[0, 3:], whole[0, 3:]), "without the reset the old life runs on"


def test_the_sampled_done_takes_the_loss_weight_out_of_the_probability():
    """The weighted BCE's optimum is logit(p) + log(w); M's done_probability gives p back."""
    rnn = MDNRNN(4, 3, hidden=8, mixtures=2, done_pos_weight=10.0)
    dones = torch.rand(20000, generator=torch.Generator().manual_seed(0)) < 0.1
    logit = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([logit], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logit.expand(len(dones)), dones.float(), pos_weight=torch.tensor(10.0)
        )
        loss.backward()
        opt.step()
    assert float(torch.sigmoid(logit.detach())) > 0.45, "the weighted optimum is inflated ~10×"
    assert abs(float(rnn.done_probability(logit.detach())) - float(dones.float().mean())) < 0.01
    assert MDNRNN(4, 3, hidden=8, mixtures=2).done_probability(torch.tensor(0.0)) == 0.5


def test_done_positive_weight():
    rnn = MDNRNN(4, 3, hidden=8, mixtures=2).eval()
    z, a = torch.randn(2, 5, 4), torch.rand(2, 5, 3)
    out, _, _ = rnn(z, a)
    done = torch.zeros(2, 5, dtype=torch.bool)
    done[:, -1] = True
    args = (out, torch.randn(2, 5, 4), torch.zeros(2, 5), done)
    plain, weighted = mdn_loss(*args).done, mdn_loss(*args, done_pos_weight=10.0).done
    assert weighted > plain, "done steps weigh more"


def test_the_reward_mask_keeps_the_ending_out_of_the_reward_loss():
    rnn = MDNRNN(4, 3, hidden=8, mixtures=2).eval()
    out, _, _ = rnn(torch.randn(1, 4, 4), torch.rand(1, 4, 3))
    done = torch.tensor([[False, False, False, True]])
    reward = torch.tensor([[0.0, 0.0, 0.0, -100.0]])
    args = (out, torch.randn(1, 4, 4), reward, done)
    kept = (~done).float()
    masked = mdn_loss(*args, reward_mask=kept).reward
    torch.testing.assert_close(masked, (out.reward[:, :3] ** 2).mean())
    assert mdn_loss(*args).reward > 1000 * masked, "the −100 ending dominates an unmasked loss"


def test_play_writes_a_gif_of_real_reconstruction_and_what_m_expects(smoke, evolve_run):
    from worldmodel.stages import headline

    run_id = run_stage(smoke("stage=play", f"inputs.evolve={evolve_run}", "play.max_steps=12"))
    run = mlflow.get_run(run_id)
    assert run.data.tags["upstream.evolve"] == evolve_run and run.info.status == "FINISHED"
    assert run.data.metrics["steps"] == 12 and headline("play", run_id) == run.data.metrics["score"]
    with Image.open(tracking.artifact_path(run_id, "play.gif")) as gif:
        assert gif.n_frames == 12
        assert gif.size == (3 * 64 * 3, 64 * 3), "three 64-pixel panels side by side, 3× enlarged"


def test_play_shows_its_frames_in_a_window_when_there_is_a_display(smoke, monkeypatch):
    from worldmodel.stages.play import _window

    assert _window(smoke("play.window=false")) is None
    monkeypatch.delenv("DISPLAY", raising=False)
    assert _window(smoke()) is None, "no display, no window"
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # a display pygame can open here
    show = _window(smoke())
    show(np.zeros((64, 192, 3), np.uint8))
    import pygame

    assert pygame.display.get_surface().get_size() == (192 * 4, 64 * 4)
    pygame.quit()


@pytest.mark.slow
def test_evaluate_registers_the_agent_and_moves_champion_only_when_beaten(smoke, evolve_run):
    import subprocess
    import sys

    client, name = MlflowClient(), "agent-carracing"
    args = ("stage=evaluate", f"inputs.evolve={evolve_run}", "evaluate.gif_steps=0", "evaluate.register=true")

    def version_of(run_id: str):
        (version,) = client.search_model_versions(f"run_id='{run_id}'")
        return version

    mine = version_of(run_stage(smoke(*args)))
    champion = client.get_model_version_by_alias(name, "champion")  # this one, or one that scored more
    assert champion.tags["evaluation"] == mine.tags["evaluation"] == "seed=0 episodes=3 max_steps=30"
    assert float(champion.tags["score"]) >= float(mine.tags["score"])
    client.set_model_version_tag(name, champion.version, "score", "-1e9")  # as if it scored less
    beaten_by = version_of(run_stage(smoke(*args)))
    assert client.get_model_version_by_alias(name, "champion").version == beaten_by.version
    version_of(run_stage(smoke(*args)))  # the same score: not better
    version_of(run_stage(smoke(*args, "evaluate.episodes=2")))  # another evaluation: not comparable
    assert client.get_model_version_by_alias(name, "champion").version == beaten_by.version

    load = (
        "import mlflow, torch; "
        f"mlflow.set_tracking_uri({mlflow.get_tracking_uri()!r}); "
        f"agent = mlflow.pytorch.load_model('models:/{name}@champion'); "
        "h = torch.zeros(1, 32); "
        "action, h, c = agent(torch.zeros(1, 64, 64, 3, dtype=torch.uint8), h, h); "
        "print(tuple(action.shape), tuple(h.shape))"
    )
    out = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "(1, 3) (1, 32)", "a fresh process loads V, M and C in one call"
    played = run_stage(smoke("stage=play", "play.agent=champion", "play.max_steps=5"))
    assert mlflow.get_run(played).data.tags["upstream.evolve"] == evolve_run


def test_play_with_an_alias_that_does_not_exist_is_one_line(smoke):
    with pytest.raises(WorldModelError, match="play.agent=nope: no such alias of agent-carracing"):
        run_stage(smoke("stage=play", "play.agent=nope"))


def test_a_replay_plays_only_the_recorded_steps_of_each_batch_once_and_matches_the_scored_episode(
    tmp_path, monkeypatch
):
    """evaluate's GIFs: the best and worst tracks are played again for their first `record` steps only,
    each lockstep batch once, and those steps earn what they earned when the episode was scored."""
    from tests.conftest import compose_config
    from worldmodel.control.scorer import RealScorer
    from worldmodel.models.checkpoints import save_checkpoint

    cfg = compose_config("experiment=smoke")
    torch.manual_seed(0)
    vae, rnn = VAE(8).eval(), MDNRNN(8, 3, hidden=16, mixtures=2).eval()
    paths = {"vae": tmp_path / "vae.pt", "rnn": tmp_path / "rnn.pt"}
    save_checkpoint(paths["vae"], vae)
    save_checkpoint(paths["rnn"], rnn)
    controller = Controller(8, 16, clip=[2])
    params = np.random.default_rng(0).standard_normal((5, controller.n_params)).astype(np.float32) * 0.3
    seeds = [seed_of(0, EVAL, i) for i in range(5)]
    with RealScorer(cfg.backend, 1, 2, paths, cfg.env, controller.hparams, 60.0) as scorer:
        scored = scorer.run(params, seeds, 40)
        played, run = [], scorer.run

        def counted(p, s, n, **kw):
            played.append((list(s), n))
            return run(p, s, n, **kw)

        monkeypatch.setattr(scorer, "run", counted)
        again = scorer.replay(params, seeds, [1, 0, 4], 12)
    assert played == [([seeds[0], seeds[1], seeds[4]], 12)], "one run: batch [0, 1] once, and [4]"
    assert sorted(again) == [0, 1, 4]
    for i, rollout in again.items():
        assert rollout.steps == 12 and len(rollout.frames) == 12 and rollout.frames[0].shape == (64, 128, 3)
        np.testing.assert_allclose(rollout.rewards, scored[i].rewards[:12])
        assert len(scored[i].rewards) == scored[i].steps == 40
        assert np.isclose(rollout.score, sum(scored[i].rewards[:12]))
