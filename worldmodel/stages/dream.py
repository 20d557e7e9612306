"""dream: hallucinated rollouts of the learned world, decoded to frames and written as GIFs.

- `dream.mode=replay`: start from a held-out real episode's first latent and drive the MDN-RNN with
  that episode's recorded actions. Each GIF frame shows three panels: real, the VAE's reconstruction,
  the dream. The latent prediction error against the real latents is logged per step.
- `dream.mode=free`: start from a real initial latent and let the evolve run's controller
  (`dream.use_controller=true`) or the `policy` group act inside the dream.
"""

from __future__ import annotations

import logging

import h5py
import mlflow
import numpy as np
import torch
from omegaconf import DictConfig

from worldmodel import policies, tracking, training
from worldmodel.agent import load_controller, load_rnn, load_vae
from worldmodel.config import check, one_of, positive_int
from worldmodel.data import latents
from worldmodel.data.datasets import episodes_in
from worldmodel.dreaming import dream_rollouts, initial_latents
from worldmodel.envs import action_space
from worldmodel.images import save_gif
from worldmodel.models.mdnrnn import sample
from worldmodel.models.vae import VAE
from worldmodel.policies import make_policy
from worldmodel.seeds import DREAM, seed_of

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    one_of(cfg, "dream.mode", ["replay", "free"])
    positive_int(cfg, "dream.steps", "dream.episodes", "dream.fps")
    check(cfg, "dream.temperature", lambda v: v >= 0, "a number ≥ 0")
    if cfg.dream.mode == "free" and not cfg.dream.use_controller:
        policies.validate(cfg)


@torch.inference_mode()
def decode(vae: VAE, z: torch.Tensor) -> np.ndarray:
    """Latents (T, Z) → uint8 frames (T, H, W, 3)."""
    return (vae.decode(z).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def run(cfg: DictConfig) -> str:
    compat = {"latent_size": str(cfg.latent.size)}
    world = training.resolve_world(cfg)
    encode_run = tracking.resolve_run(cfg, "encode", world.encode_id, {})
    vae = load_vae(training.checkpoint_path(world.vae_run.info.run_id))
    rnn = load_rnn(training.checkpoint_path(world.rnn_run.info.run_id))
    upstream = world.upstream
    controller = None
    if cfg.dream.mode == "free" and cfg.dream.use_controller:
        evolve_run = tracking.resolve_run(cfg, "evolve", cfg.inputs.evolve, compat)
        controller = load_controller(training.agent_files(evolve_run)["controller"])
        upstream["evolve"] = evolve_run.info.run_id
    lat_path = tracking.artifact_path(encode_run.info.run_id, "latents.h5")
    latents.inspect(lat_path, int(cfg.latent.size))

    with tracking.stage_run(cfg, "dream", ["dream", "latent"], upstream, compat) as run:
        out_dir, in_place = tracking.local_artifact_dir("gifs")
        if cfg.dream.mode == "replay":
            dataset = tracking.artifact_path(encode_run.data.tags["upstream.merge"], "dataset.h5")
            _replay(cfg, vae, rnn, lat_path, dataset, out_dir, in_place)
        else:
            _free(cfg, vae, rnn, controller, lat_path, out_dir, in_place)
        return run.info.run_id


def _held_out(lat_path) -> list[int]:
    """Validation episodes (every episode when there are none)."""
    return list(episodes_in(lat_path, "val")) or list(episodes_in(lat_path, "all"))


@torch.inference_mode()
def _replay(cfg: DictConfig, vae: VAE, rnn, lat_path, dataset, out_dir, in_place: bool) -> None:
    episodes = _held_out(lat_path)[: int(cfg.dream.episodes)]
    generator = torch.Generator().manual_seed(int(cfg.seed))
    errors = []
    with h5py.File(lat_path, "r") as lf, h5py.File(dataset, "r") as df:
        for k, e in enumerate(episodes):
            steps = min(int(cfg.dream.steps), int(lf["lengths"][e]))
            mu = torch.from_numpy(lf["mu"][e, :steps])
            actions = torch.from_numpy(lf["actions"][e, :steps])
            dreamed, z, state = [mu[0]], mu[:1], rnn.initial_state(1)
            for t in range(steps - 1):
                out, state = rnn.step(z, actions[t : t + 1], state)
                z = sample(out.mixture, float(cfg.dream.temperature), generator)
                dreamed.append(z[0])
            dreamed = torch.stack(dreamed)
            errors.append((dreamed - mu).pow(2).mean(1).numpy())
            real = df["images"][e, :steps]
            panels = np.concatenate([real, decode(vae, mu), decode(vae, dreamed)], axis=2)
            name = f"replay_{k:03d}.gif"
            save_gif(list(panels), out_dir / name, int(cfg.dream.fps))
            tracking.publish(out_dir / name, "gifs", in_place)
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
def _free(cfg: DictConfig, vae: VAE, rnn, controller, lat_path, out_dir, in_place: bool) -> None:
    n, steps, temperature = int(cfg.dream.episodes), int(cfg.dream.steps), float(cfg.dream.temperature)
    seeds = [seed_of(int(cfg.seed), DREAM, i) for i in range(n)]
    z0 = initial_latents(*latents.first_steps(lat_path, episodes_in(lat_path, "all")), seeds)
    if controller is not None:
        params = controller.get_flat().expand(n, -1)
        returns, visited = dream_rollouts(rnn, controller, params, z0, seeds, steps, temperature, record=True)
    else:  # a policy from the policy group acts on the dream
        generator = torch.Generator().manual_seed(int(cfg.seed))
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
        name = f"free_{i:03d}.gif"
        save_gif(list(decode(vae, visited[:, i])), out_dir / name, int(cfg.dream.fps))
        tracking.publish(out_dir / name, "gifs", in_place)
    mlflow.log_metric("free/dream_return_mean", float(returns.mean()))
    log.info(
        "dream free: %d dreams of up to %d steps, predicted return %.1f", n, steps, float(returns.mean())
    )
