"""dream: hallucinated rollouts of the learned world, decoded to frames and written as GIFs.

- `dream.mode=replay`: start from a held-out real episode's first latent and drive the MDN-RNN with
  that episode's recorded actions. Each GIF frame shows three panels: real, the VAE's reconstruction,
  the dream. The latent prediction error against the real latents is logged per step.
- `dream.mode=free`: start from a real initial latent and let the evolve run's controller
  (`dream.use_controller=true`) or the `policy` group act inside the dream.
- `dream.mode=fidelity`: does the dream rank controllers as the real env does? Probes, random
  candidates and the controllers of the evolve runs named in `inputs.evolve` (one id or a list) are
  scored in the dream (evolve's dream settings, `dream.fidelity_dreams` each) and in the real env
  (`dream.fidelity_tracks` full tracks each), all through this world's V and M. Logs
  `fidelity/spearman`, the scatter plot `fidelity/dream_vs_real.png` with its table
  `fidelity/controllers.csv`, and M's teacher-forced reward error per `dream.fidelity_block` steps
  over the held-out episodes (`fidelity/reward_blocks.csv`, metric `fidelity/reward_mse` by block).
  Whether M listens to the actions: `fidelity/action_nll_gain` and `fidelity/action_reward_mse_gain`,
  how much its loss on those episodes grows when each is fed its actions from half an episode later (≈ 0: it
  ignores them, and every controller drives alike in its dream).
"""

from __future__ import annotations

import csv
import logging

import h5py
import mlflow
import numpy as np
import torch
from omegaconf import DictConfig

from worldmodel import tracking
from worldmodel.config import settings
from worldmodel.config.sections import Dream, DreamMode, Evolve
from worldmodel.control import cma as cma_history
from worldmodel.control import fidelity, policies
from worldmodel.control.agent import controller_for, load_controller, load_rnn, load_vae
from worldmodel.control.dream import DreamSettings, dream_returns, dream_rollouts, initial_latents
from worldmodel.control.policies import make_policy
from worldmodel.control.scorer import real_scorer
from worldmodel.data import latents
from worldmodel.data.datasets import episodes_in
from worldmodel.envs.pixels import action_space
from worldmodel.images import save_gif
from worldmodel.models.controller import Controller
from worldmodel.models.mdnrnn import sample
from worldmodel.models.vae import VAE, to_frames
from worldmodel.seeds import DREAM, FIDELITY, seed_of
from worldmodel.stages.merge import dataset_of
from worldmodel.tracking import lineage

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    dream = settings(cfg, Dream)
    if dream.mode == DreamMode.free and not dream.use_controller:
        policies.validate(cfg)


@torch.inference_mode()
def decode(vae: VAE, z: torch.Tensor) -> np.ndarray:
    """Latents (T, Z) → uint8 frames (T, H, W, 3)."""
    return to_frames(vae.decode(z))


def run(cfg: DictConfig) -> str:
    dream = settings(cfg, Dream)
    compat = tracking.compat(cfg, "latent_size")
    world = tracking.resolve_world(cfg)
    encode_run = tracking.resolve_run(cfg, "encode", world.encode_id, {})
    vae = load_vae(tracking.checkpoint_path(world.vae_run.info.run_id))
    rnn = load_rnn(tracking.checkpoint_path(world.rnn_run.info.run_id))
    upstream = world.upstream
    if dream.mode == DreamMode.fidelity:
        return _fidelity(cfg, world, rnn)
    controller = None
    if dream.mode == DreamMode.free and dream.use_controller:
        evolve_run = tracking.resolve_run(cfg, "evolve", cfg.inputs.evolve, compat)
        controller = load_controller(tracking.agent_files(evolve_run)["controller"], action_space(cfg.env))
        upstream["evolve"] = evolve_run.info.run_id
    lat_path = tracking.artifact_path(encode_run.info.run_id, lineage.LATENTS)
    latents.inspect(lat_path, cfg.latent.size)

    with tracking.stage_run(cfg, "dream", ["dream", "latent"], upstream, compat) as run:
        tracking.log_dataset(world.encode_id, lineage.LATENTS, "dream")
        if dream.mode == DreamMode.replay:
            dataset, _ = dataset_of(tracking.upstream_run(encode_run, "merge").info.run_id)
            _replay(cfg, vae, rnn, lat_path, dataset)
        else:
            _free(cfg, vae, rnn, controller, lat_path)
        return run.info.run_id


def _held_out(lat_path) -> list[int]:
    """Validation episodes (every episode when there are none)."""
    return list(episodes_in(lat_path, "val")) or list(episodes_in(lat_path, "all"))


@torch.inference_mode()
def _replay(cfg: DictConfig, vae: VAE, rnn, lat_path, dataset) -> None:
    dream = settings(cfg, Dream)
    episodes = _held_out(lat_path)[: dream.episodes]
    generator = torch.Generator().manual_seed(cfg.seed)
    errors = []
    with h5py.File(lat_path, "r") as lf, h5py.File(dataset, "r") as df:
        for k, e in enumerate(episodes):
            steps = min(dream.steps, int(lf["lengths"][e]))
            mu = torch.from_numpy(lf["mu"][e, :steps])
            actions = torch.from_numpy(lf["actions"][e, :steps])
            dreamed, z, state = [mu[0]], mu[:1], rnn.initial_state(1)
            for t in range(steps - 1):
                out, state = rnn.step(z, actions[t : t + 1], state)
                z = sample(out.mixture, dream.temperature, generator)
                dreamed.append(z[0])
            dreamed = torch.stack(dreamed)
            errors.append((dreamed - mu).pow(2).mean(1).numpy())
            real = df["images"][e, :steps]
            panels = np.concatenate([real, decode(vae, mu), decode(vae, dreamed)], axis=2)
            with tracking.artifact(f"gifs/replay_{k:03d}.gif") as path:
                save_gif(list(panels), path, dream.fps)
    length = min(len(x) for x in errors)
    per_step = np.mean([x[:length] for x in errors], axis=0)
    for t, value in enumerate(per_step):
        mlflow.log_metric("replay/latent_mse", float(value), step=t)
    mlflow.log_metric("replay/latent_mse_mean", float(per_step.mean()))
    log.info(
        "dream replay: %d episodes, latent MSE %.3f at step 1, %.3f on average",
        len(errors),
        per_step[min(1, length - 1)],
        per_step.mean(),
    )


@torch.inference_mode()
def _free(cfg: DictConfig, vae: VAE, rnn, controller, lat_path) -> None:
    dream = settings(cfg, Dream)
    n, steps, temperature = dream.episodes, dream.steps, dream.temperature
    seeds = [seed_of(cfg.seed, DREAM, i) for i in range(n)]
    z0 = initial_latents(*latents.first_steps(lat_path, episodes_in(lat_path, "all")), seeds)
    if controller is not None:
        params = controller.get_flat().expand(n, -1)
        returns, visited = dream_rollouts(rnn, controller, params, z0, seeds, steps, temperature, record=True)
    else:  # a policy from the policy group acts on the dream
        generator = torch.Generator().manual_seed(cfg.seed)
        space = action_space(cfg.env)
        policies = [make_policy(cfg.policy, space, np.random.default_rng(s)) for s in seeds]
        z, state, visited, returns = z0, rnn.initial_state(n), [], torch.zeros(n)
        for t in range(steps):
            visited.append(z)
            a = torch.from_numpy(np.stack([p.act(None, t) for p in policies]))
            out, state = rnn.step(z, a, state)
            returns += out.reward
            z = sample(out.mixture, temperature, generator)
        visited = torch.stack(visited)
    for i in range(n):
        with tracking.artifact(f"gifs/free_{i:03d}.gif") as path:
            save_gif(list(decode(vae, visited[:, i])), path, dream.fps)
    mlflow.log_metric("free/dream_return_mean", float(returns.mean()))
    log.info(
        "dream free: %d dreams of up to %d steps, predicted return %.1f", n, steps, float(returns.mean())
    )


# ---- dream.mode=fidelity ------------------------------------------------------------------------------


def _fidelity(cfg: DictConfig, world: tracking.World, rnn) -> str:
    named = _named_controllers(cfg, world)
    upstream = world.upstream | {f"evolve.{i}": run_id for i, run_id in enumerate(named)}
    with tracking.stage_run(
        cfg, "dream", ["dream", "latent", "agent"], upstream, {"mode": "fidelity"}
    ) as run:
        groups = _fidelity_candidates(cfg, rnn, named)
        rows = [
            row
            for controller, candidates in groups
            for row in _score(cfg, world, rnn, controller, candidates)
        ]
        names = [r["controller"] for r in rows]
        dream, real = (np.array([r[k] for r in rows]) for k in ("dream_mean", "real_mean"))
        rho = fidelity.spearman(dream, real)
        mlflow.log_metrics({"fidelity/spearman": rho, "fidelity/controllers": len(rows)})
        _write_csv("fidelity/controllers.csv", rows)
        with tracking.artifact("fidelity/dream_vs_real.png") as path:
            fidelity.scatter(names, dream, real, rho, path)
        for r in rows:
            log.info(
                "fidelity: %-28s dream %8.1f  real %8.1f", r["controller"], r["dream_mean"], r["real_mean"]
            )
        log.info("fidelity: Spearman ρ = %.3f over %d controllers", rho, len(rows))
        _reward_blocks(cfg, world, rnn)
        return run.info.run_id


def _named_controllers(cfg: DictConfig, world: tracking.World) -> dict[str, tuple[Controller, dict]]:
    """The evolve runs in `inputs.evolve` (none, one id or a list), by run id: each one's controller
    shape and {name: parameters} for its kept controller and CMA-ES's mean at
    `dream.fidelity_history` generations spread over its run, rebuilt by replaying its history."""
    ids = cfg.inputs.evolve
    ids = [] if ids is None else [ids] if isinstance(ids, str) else list(ids)
    out = {}
    for run_id in ids:
        run = tracking.resolve_run(cfg, "evolve", str(run_id), tracking.compat(cfg, "latent_size"))
        controller = load_controller(tracking.agent_files(run)["controller"], action_space(cfg.env))
        if tracking.upstream(run, "train_rnn") != world.rnn_run.info.run_id:
            log.warning("fidelity: evolve run %s was trained on another M; here it reads this M's h", run_id)
        name = f"evolve {run.info.run_id[:8]}"
        candidates = _history_means(cfg, run, controller, name)
        candidates[name] = controller.get_flat().numpy()
        out[run.info.run_id] = (controller, candidates)
    return out


def _history_means(cfg: DictConfig, run, controller: Controller, name: str) -> dict[str, np.ndarray]:
    """CMA-ES's mean after `dream.fidelity_history` generations spread over the run (none without a
    history): controllers of every quality the run went through."""
    wanted = settings(cfg, Dream).fidelity_history
    if not wanted or lineage.HISTORY not in tracking.list_artifacts(run.info.run_id, "cma"):
        return {}
    hp = tracking.run_settings(run, Evolve)
    es = cma_history.es_for(controller, hp, int(run.data.params["seed"]))
    means = {}
    for gen, *_ in cma_history.replay(es, run.info.run_id, hp.popsize):
        means[gen] = np.asarray(es.mean, np.float32).copy()
    picks = np.unique(np.linspace(0, len(means) - 1, wanted).round().astype(int))
    return {f"{name} gen {g}": means[int(g)] for g in picks}


def _fidelity_candidates(cfg: DictConfig, rnn, named: dict) -> list[tuple[Controller, dict[str, np.ndarray]]]:
    """Groups of (controller shape, {name: parameters}): the probes and random candidates take the first
    named controller's shape (or evolve's), and a named run joins them when its shape is the same."""
    dream = settings(cfg, Dream)
    evolve = settings(cfg, Evolve)
    base = next(iter(named.values()), (controller_for(cfg, rnn), {}))[0]
    rng = np.random.default_rng(seed_of(cfg.seed, FIDELITY, 2))
    first = fidelity.probes(base)
    scales = base.step_scales(evolve.memory_sigma).numpy()
    for i in range(dream.fidelity_random):
        first[f"random {i}"] = (rng.normal(0, evolve.sigma0, base.n_params) * scales).astype(np.float32)
    groups = [(base, first)]
    for controller, candidates in named.values():
        if controller.hparams == base.hparams:
            first.update(candidates)
        else:
            groups.append((controller, candidates))
    return groups


def _score(
    cfg: DictConfig, world: tracking.World, rnn, controller: Controller, candidates: dict
) -> list[dict]:
    """Each candidate's dreamed and real returns: the same dream seeds and the same tracks for all."""
    dream = settings(cfg, Dream)
    evolve = settings(cfg, Evolve)
    params = np.stack(list(candidates.values()))
    dream_seeds = [seed_of(cfg.seed, FIDELITY, 1, r) for r in range(dream.fidelity_dreams)]
    dreams = dream_returns(
        rnn, controller, params, dream_seeds, world.dream_starts(cfg), DreamSettings.of(cfg)
    )
    tracks = [seed_of(cfg.seed, FIDELITY, 0, r) for r in range(dream.fidelity_tracks)]
    files = {
        k: str(tracking.checkpoint_path(r.info.run_id))
        for k, r in (("vae", world.vae_run), ("rnn", world.rnn_run))
    }
    with real_scorer(cfg, "evolve", files, controller.hparams) as scorer:
        every = np.repeat(params, len(tracks), axis=0)
        rollouts = scorer.run(every, tracks * len(params), evolve.max_steps, progress="fidelity")
    real = np.array([r.score for r in rollouts]).reshape(len(params), len(tracks))
    return [
        {
            "controller": name,
            "dream_mean": float(dreams[i].mean()),
            "dream_std": float(dreams[i].std()),
            "real_mean": float(real[i].mean()),
            "real_std": float(real[i].std()),
        }
        for i, name in enumerate(candidates)
    ]


def _write_csv(name: str, rows: list[dict]) -> None:
    with tracking.artifact(name) as path, open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _reward_blocks(cfg: DictConfig, world: tracking.World, rnn) -> None:
    """M's reward head, teacher-forced over the held-out episodes, per `dream.fidelity_block` steps."""
    dream = settings(cfg, Dream)
    path = tracking.artifact_path(world.encode_id, lineage.LATENTS)
    data = latents.read(path, np.asarray(_held_out(path)[:64]))  # enough for a per-block mean
    steps = int(data["lengths"].min())
    mu, logvar = (torch.from_numpy(data[k][:, :steps]) for k in ("mu", "logvar"))
    z = mu
    if cfg.agent.z == "sample":
        generator = torch.Generator().manual_seed(seed_of(cfg.seed, FIDELITY, 3))
        z = mu + torch.randn(mu.shape, generator=generator) * torch.exp(0.5 * logvar)
    actions, rewards, dones = (torch.from_numpy(data[k][:, :steps]) for k in ("actions", "rewards", "dones"))
    block = min(dream.fidelity_block, steps)
    blocks = fidelity.reward_blocks(rnn, z, actions, rewards, dones, block, DreamSettings.of(cfg).done_reward)
    rows = []
    for k in range(len(blocks.mse)):
        row = {
            "steps": f"{k * blocks.block}-{(k + 1) * blocks.block - 1}",
            "reward_mse": float(blocks.mse[k]),
            "return_predicted": float(blocks.predicted[k]),
            "return_real": float(blocks.real[k]),
            "dones_predicted": float(blocks.done_predicted[k]),
            "dones_real": float(blocks.done_real[k]),
        }
        rows.append(row)
        mlflow.log_metrics({f"fidelity/{key}": value for key, value in row.items() if key != "steps"}, step=k)
        log.info(
            "fidelity: M's reward, steps %s: %s",
            row["steps"],
            {k: round(v, 2) for k, v in row.items() if k != "steps"},
        )
    _write_csv("fidelity/reward_blocks.csv", rows)
    heard = fidelity.action_sensitivity(rnn, z, actions, rewards)
    mlflow.log_metrics(
        {
            "fidelity/action_nll_gain": heard.nll_foreign - heard.nll,
            "fidelity/action_reward_mse_gain": heard.reward_mse_foreign - heard.reward_mse,
        }
    )
    log.info(
        "fidelity: with the actions of another moment, M's NLL %.3f → %.3f and its reward MSE %.2f → %.2f",
        heard.nll,
        heard.nll_foreign,
        heard.reward_mse,
        heard.reward_mse_foreign,
    )
