"""play: watch an agent play one episode in the real env.

`python -m worldmodel stage=play inputs.evolve=<id>` (or `play.agent=champion`, the registered agent's
alias) plays the evolve run's V, M and C on one unseen
track (`play.seed`, from evaluate's seed stream) and writes `play.gif`. Each frame shows three panels:
the real frame, V's reconstruction of it, and what M expects to come next. That last panel is the
decoded mean of M's most likely mixture component, given z and the action taken. With a display
($DISPLAY) and `play.window=true`, the same frames are also shown in a window as the agent plays.
"""

from __future__ import annotations

import logging
import os

import mlflow
import numpy as np
import torch
from omegaconf import DictConfig

from worldmodel import tracking
from worldmodel.config import settings
from worldmodel.config.sections import Dream, Play
from worldmodel.control.agent import Agent, load_controller, load_rnn, load_vae
from worldmodel.control.scorer import eval_seeds
from worldmodel.envs.pixels import action_space, make_env
from worldmodel.errors import WorldModelError
from worldmodel.images import save_gif
from worldmodel.models.mdnrnn import sample_with_noise
from worldmodel.models.vae import to_frames, to_input
from worldmodel.tracking import lineage

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    settings(cfg, Play)


def run(cfg: DictConfig) -> str:
    hp = settings(cfg, Play)
    dream = settings(cfg, Dream)
    evolve_id = _aliased(cfg) if hp.agent else cfg.inputs.evolve
    evolve_run = tracking.resolve_run(cfg, "evolve", evolve_id, tracking.compat(cfg, "latent_size"))
    files = tracking.agent_files(evolve_run)
    z = evolve_run.data.params.get("agent.z", "mean")  # read z as the controller was trained to
    agent = Agent(
        load_vae(files["vae"]),
        load_rnn(files["rnn"]),
        load_controller(files["controller"], action_space(cfg.env)),
        z=z,
    )
    seed = eval_seeds(cfg, hp.seed + 1)[-1]
    steps = int(hp.max_steps or cfg.env.episode_steps)
    upstream = {"evolve": evolve_run.info.run_id}
    with tracking.stage_run(cfg, "play", ["play"], upstream) as run:
        env, window = make_env(cfg.env), _window(cfg)
        try:
            score, frames = _episode(env, agent, seed, steps, hp.gif_steps, window)
        finally:
            env.close()
        with tracking.artifact(lineage.PLAY) as path:
            save_gif(frames, path, dream.fps)
        mlflow.log_metrics({"score": score, "steps": float(len(frames))})
        log.info(
            "play: %.1f on track %d over %d steps → %s of run %s",
            score,
            seed,
            len(frames),
            lineage.PLAY,
            run.info.run_id,
        )
        return run.info.run_id


def _aliased(cfg: DictConfig) -> str:
    """The evolve run behind an alias of the registered agent (`play.agent=champion`)."""
    hp = settings(cfg, Play)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracking.setup(cfg)
    name = f"agent-{cfg.env.name}"
    try:
        version = MlflowClient().get_model_version_by_alias(name, hp.agent)
    except MlflowException as err:
        raise WorldModelError(
            f"play.agent={hp.agent}: no such alias of {name} in {tracking.tracking_uri(cfg)}; "
            "run stage=evaluate first, or pass inputs.evolve=<run id>"
        ) from err
    return tracking.upstream_run(mlflow.get_run(version.run_id), "evolve").info.run_id  # its controller


@torch.inference_mode()
def _episode(env, agent: Agent, seed: int, steps: int, keep: int, window) -> tuple[float, list[np.ndarray]]:
    """One episode: its score and its first `keep` frames as [real | reconstruction | M's next]."""
    frame, score, frames = env.reset(seed=seed), 0.0, []
    agent.reset([seed])
    for _ in range(steps):
        state = (agent.state[0].clone(), agent.state[1].clone())
        action = agent.act(frame[None])
        if len(frames) < keep:
            frames.append(_panels(agent, frame, action, state))
            if window is not None:
                window(frames[-1])
        frame, reward, terminated, truncated = env.step(action[0])
        score += reward
        if terminated or truncated:
            break
    return score, frames


def _panels(agent: Agent, frame: np.ndarray, action: np.ndarray, state) -> np.ndarray:
    mu, _ = agent.vae.encode(to_input(torch.from_numpy(frame[None])))
    out, _ = agent.rnn.step(mu, torch.from_numpy(action), state)
    expected = sample_with_noise(out.mixture, 0.0, None, None)  # temperature 0: the likeliest mean
    recon, nxt = to_frames(agent.vae.decode(torch.cat([mu, expected])))
    return np.concatenate([frame, recon, nxt], axis=1)


def _window(cfg: DictConfig):
    """A function that shows a frame in a window (pygame, which gymnasium's box2d brings), or None."""
    hp = settings(cfg, Play)
    if not hp.window or not os.environ.get("DISPLAY"):
        return None
    import pygame

    pygame.init()
    screen, scale = None, 4

    def show(panels: np.ndarray) -> None:
        nonlocal screen
        h, w = panels.shape[:2]
        if screen is None:
            screen = pygame.display.set_mode((w * scale, h * scale))
            pygame.display.set_caption("worldmodel play: real | V | M's next")
        surface = pygame.surfarray.make_surface(np.ascontiguousarray(panels.transpose(1, 0, 2)))
        screen.blit(pygame.transform.scale(surface, (w * scale, h * scale)), (0, 0))
        pygame.display.flip()
        pygame.event.pump()

    return show
