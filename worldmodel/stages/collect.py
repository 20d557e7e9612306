"""collect: roll out a policy in parallel workers and write compressed HDF5 shards.

Shard k holds episodes [k·S, (k+1)·S) with S = collect.episodes_per_shard. Workers only roll out;
this process writes each episode into its shard as it arrives, under a `.partial` name that becomes
`shard_XXXXX.h5` once the shard is complete. Resuming (inputs.resume=<run id>) keeps the complete
shards that read back whole and collects only the rest; a FINISHED run can be resumed too, to repair a
shard that was deleted or damaged (its replacement is written beside it and takes its place when
complete).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import mlflow
import numpy as np
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from worldmodel import files, tracking
from worldmodel.config import check, settings
from worldmodel.config.sections import Collect
from worldmodel.control import policies
from worldmodel.control.episodes import episode_task, init_worker, run_episode
from worldmodel.data import rollouts
from worldmodel.errors import WorldModelError
from worldmodel.files import partial_of
from worldmodel.images import mosaic
from worldmodel.parallel.pool import make_pool
from worldmodel.progress import progress_bar
from worldmodel.tracking import lineage

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    settings(cfg, Collect)
    policies.validate(cfg)
    from worldmodel.models.vae import SIZES  # the frames are for the VAE: refuse a size it cannot take

    check(cfg, "env.image_size", lambda v: v in SIZES, f"one of {list(SIZES)} for the VAE")


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.h5"


def run(cfg: DictConfig) -> str:
    tags = {"image_size": str(cfg.env.image_size), "policy": str(cfg.policy.name)}
    with tracking.stage_run(
        cfg,
        "collect",
        ["env", "policy", "collect"],
        upstream=_resolve_agent(cfg),
        tags=tags,
        resume=cfg.inputs.resume,
        may_change=["collect.workers"],
        repairable=True,
    ) as run:
        hp = settings(cfg, Collect)
        out = tracking.OutputDir(lineage.SHARDS)
        todo = _todo(cfg, hp, run.info.run_id, out)
        if not todo:
            log.info("collect: every shard of run %s is present and reads back whole", run.info.run_id)
            return run.info.run_id
        # Frames compress 3-4× (CarRacing 3.6×); room for a third of the raw frames, before any work.
        frame_bytes = cfg.env.image_size**2 * 3
        files.check_room(out.path, len(todo) * hp.max_steps * frame_bytes // 3, "collect")
        shards = ShardWriter(
            out.path,
            hp.episodes_per_shard,
            hp.episodes,
            hp.max_steps,
            cfg.env.image_size,
            _shard_attrs(cfg, hp, run.info.run_id),
            on_complete=out.publish,
        )
        start = time.perf_counter()
        returns, samples = _collect(cfg, hp, todo, shards)
        _log_results(hp, len(todo), returns, samples, time.perf_counter() - start, run.info.run_id)
        return run.info.run_id


def _todo(cfg: DictConfig, hp: Collect, run_id: str, out: tracking.OutputDir) -> list[int]:
    """The episodes still to collect: those of the shards not already complete."""
    episodes, per_shard = hp.episodes, hp.episodes_per_shard
    n_shards = -(-episodes // per_shard)
    done = _complete_shards(run_id, n_shards, out)
    todo = [
        i
        for k in range(n_shards)
        if k not in done
        for i in range(k * per_shard, min((k + 1) * per_shard, episodes))
    ]
    log.info(
        "collect: %d episodes × %d steps with %s workers on backend %s (%d shards already complete)",
        *(len(todo), hp.max_steps, hp.workers or "all", cfg.backend.name, len(done)),
    )
    return todo


def _shard_attrs(cfg: DictConfig, hp: Collect, run_id: str) -> dict:
    return {
        "env_id": str(cfg.env.id),
        "image_size": cfg.env.image_size,
        "crop": ",".join(str(cfg.env.crop[k]) for k in ("top", "bottom", "left", "right")),
        "max_steps": hp.max_steps,
        "reset_on_done": hp.reset_on_done,
        "policy": str(cfg.policy.name),
        "seed": cfg.seed,
        "run_id": run_id,
    }


def _collect(
    cfg: DictConfig, hp: Collect, todo: list[int], shards: ShardWriter
) -> tuple[list[float], list[np.ndarray]]:
    """Episodes into their shards as they come; their returns, and sample frames in episode order."""
    returns, samples, logged = [], {}, time.monotonic()
    wanted, episodes = hp.mosaic_frames, hp.episodes
    try:
        with progress_bar(total=len(todo), desc="collect", unit="ep") as bar:
            for ep in _episodes(cfg, todo, hp.workers, hp.episode_timeout):  # workers None: every core
                shards.add(ep)
                returns.append(ep.episode_return)
                samples[ep.index] = _sample_frames(ep, wanted, episodes)
                bar.update(1)
                bar.set_postfix(ret=f"{np.mean(returns):.1f}", refresh=False)
                if time.monotonic() - logged > 5 or len(returns) == len(todo):  # not a write per episode
                    mlflow.log_metric("progress/episodes", len(returns), step=len(returns))
                    logged = time.monotonic()
    except BaseException:
        shards.abort()  # an interrupted shard is not kept
        raise
    return returns, [frame for i in sorted(samples) for frame in samples[i]]


def _log_results(
    hp: Collect,
    collected: int,
    returns: list[float],
    samples: list[np.ndarray],
    elapsed: float,
    run_id: str,
) -> None:
    episodes, steps = hp.episodes, hp.max_steps
    frames = collected * steps
    metrics = {
        "episodes": float(episodes),
        "frames": float(episodes * steps),
        "frames_per_s": frames / elapsed if elapsed > 0 else 0.0,
    }
    if returns:
        metrics |= {"return_mean": float(np.mean(returns)), "return_std": float(np.std(returns))}
    mlflow.log_metrics(metrics)
    if samples:
        mlflow.log_image(mosaic(samples[: hp.mosaic_frames]), "sample_frames.png")
    log.info(
        "collect: %d frames at %.0f frames/s, return %.1f ± %.1f → run %s",
        *(
            frames,
            metrics["frames_per_s"],
            metrics.get("return_mean", 0),
            metrics.get("return_std", 0),
            run_id,
        ),
    )


class ShardWriter:
    """Writes episodes into their shards as they arrive, in any order: shard k holds episodes
    [k·S, (k+1)·S) and is renamed from `.partial` to its final name once its last episode is in."""

    def __init__(
        self,
        out_dir: Path,
        per_shard: int,
        episodes: int,
        steps: int,
        image_size: int,
        attrs: dict,
        on_complete: Callable[[Path], None],
    ) -> None:
        self.out_dir, self.per_shard, self.episodes = out_dir, per_shard, episodes
        self.steps, self.image_size, self.attrs, self.on_complete = steps, image_size, attrs, on_complete
        self.open: dict[
            int, tuple[h5py.File, Path, int]
        ] = {}  # shard → (file, partial path, episodes to come)

    def add(self, ep: rollouts.Episode) -> None:
        k = ep.index // self.per_shard
        final = self.out_dir / shard_name(k)
        if k not in self.open:
            size = min(self.per_shard, self.episodes - k * self.per_shard)
            self.open[k] = (None, partial_of(final), size)  # abort removes it if create fails halfway
            f = rollouts.create(
                partial_of(final), size, self.steps, self.image_size, ep.actions.shape[1], self.attrs
            )
            self.open[k] = (f, partial_of(final), size)
        f, partial, remaining = self.open[k]
        rollouts.write_episode(f, ep.index - k * self.per_shard, ep)
        if remaining > 1:
            self.open[k] = (f, partial, remaining - 1)
            return
        rollouts.finish(f, partial, final)
        del self.open[k]
        self.on_complete(final)

    def abort(self) -> None:
        """Close and remove every shard still being written (a failed finish included)."""
        for f, partial, _ in self.open.values():
            if f is not None:
                with contextlib.suppress(Exception):  # a full disk can fail the close too
                    f.close()
            partial.unlink(missing_ok=True)
        self.open.clear()


def _resolve_agent(cfg: DictConfig) -> dict[str, str]:
    """A policy that acts through a trained agent (policy=controller: an evolve run's V, M and C, reading
    z as that run did; linear_random: a train_rnn run's V and M, reading z as `agent.z` says): find the
    run, put its checkpoint files into `policy.paths`."""
    stage = get_class(str(cfg.policy._target_)).acts_through
    if stage is None:
        return {}

    run = tracking.resolve_run(cfg, stage, cfg.policy.run_id, tracking.compat(cfg, "latent_size"))
    with open_dict(cfg):
        if stage == "evolve":
            cfg.policy.paths = tracking.agent_files(run)
            cfg.policy.z = run.data.params.get("agent.z", "mean")  # as the controller was trained
        else:
            tracking.check_agent_z(cfg, run)
            vae = tracking.upstream_run(run, "train_vae").info.run_id
            checkpoints = (("vae", vae), ("rnn", run.info.run_id))
            cfg.policy.paths = {k: str(tracking.checkpoint_path(r)) for k, r in checkpoints}
            cfg.policy.z = cfg.agent.z
    return {stage: run.info.run_id}


def _complete_shards(run_id: str, n_shards: int, out: tracking.OutputDir) -> set[int]:
    """Shards already finished by an earlier attempt of this run; leftovers of an interrupted shard go."""
    # An interrupted attempt's shards, by their exact names, in this run's own directory only.
    files.remove_partials(out.path, [shard_name(k) for k in range(n_shards)])
    present = {Path(p).name for p in tracking.list_artifacts(run_id, lineage.SHARDS)}
    done = set()
    for k in range(n_shards):
        if shard_name(k) in present:
            path = (
                out / shard_name(k)
                if out.in_store
                else tracking.artifact_path(run_id, f"{lineage.SHARDS}/{shard_name(k)}")
            )
            try:
                rollouts.inspect(path)
                rollouts.verify(path, "")
            except WorldModelError as err:
                log.warning("collect: %s is damaged, collecting it again (%s)", shard_name(k), err)
                continue
            done.add(k)
    return done


def _episodes(cfg: DictConfig, indices: list[int], workers: int | None, timeout: float):
    """Episodes in completion order; from the backend's workers, or this process when workers is 1. A
    worker that dies or hangs (collect.episode_timeout) is replaced and its episode collected again."""
    if workers == 1 or len(indices) <= 1:
        for i in indices:
            yield run_episode(cfg, i)
        return
    plain = OmegaConf.to_container(cfg, resolve=True)
    with make_pool(
        cfg.backend,
        workers,
        init_worker,
        (plain,),
        episode_task,
        timeout=timeout,
        most=len(indices),
    ) as pool:
        for _, episode in pool.imap_unordered(indices):
            yield episode


def _sample_frames(ep: rollouts.Episode, wanted: int, episodes: int) -> list[np.ndarray]:
    per_episode = -(-int(wanted) // episodes)
    steps = np.linspace(0, ep.length - 1, per_episode + 2, dtype=int)[1:-1]
    return [ep.frame(t) for t in steps]
