"""Lineage: what each stage writes, the `upstream.<stage>` tags that link a run to its inputs, and
finding a run's inputs: by explicit run id, or the latest FINISHED compatible run of the upstream stage
(a resumed run keeps the upstream runs it started with unless another is named)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from worldmodel.config import RESUMABLE, Settings, settings
from worldmodel.config.sections import Evolve, InitialZ
from worldmodel.errors import WorldModelError
from worldmodel.models.checkpoints import load_checkpoint
from worldmodel.tracking.artifacts import artifact_path
from worldmodel.tracking.store import setup, tracking_uri

# The artifacts that stages hand on, by name: written here once, for their writers and their readers.
SHARDS = "shards"  # collect: shards/shard_<k>.h5
DATASET = "dataset.h5"  # merge
LATENTS = "latents.h5"  # encode
CHECKPOINTS = "checkpoints"  # train_vae, train_rnn: checkpoints/best.pt and last.pt
CONTROLLER = "controller.pt"  # evolve
HISTORY = "cma/history.npz"  # evolve: CMA-ES's fitness history, for resume and the fidelity check
SCORES, HISTOGRAM = "scores.csv", "score_histogram.png"  # evolve's final evaluation, evaluate
REPORT = (SCORES, HISTOGRAM, "gifs/*.gif")
PLAY = "play.gif"  # play
CONFIG = "config/config.yaml"  # every run: its resolved config

# What each stage writes itself, relative to its artifact root (globs): the reaper removes the partial
# files of exactly these names (files.partial_of), and no other file.
WRITES = {
    "collect": (f"{SHARDS}/shard_*.h5",),
    "merge": (DATASET,),
    "encode": (LATENTS,),
    "train_vae": (f"{CHECKPOINTS}/best.pt", f"{CHECKPOINTS}/last.pt"),
    "train_rnn": (f"{CHECKPOINTS}/best.pt", f"{CHECKPOINTS}/last.pt"),
    "evolve": (CONTROLLER, HISTORY, *REPORT),
    "evaluate": REPORT,
    "dream": ("gifs/*.gif", "fidelity/*.png", "fidelity/*.csv"),
    "play": (PLAY,),
    "pipeline": (),
    "sweep": (),
}


# The tags that say which runs fit together, and the config keys they record.
COMPAT = {"latent_size": "latent.size", "image_size": "env.image_size"}


def compat(cfg: DictConfig, *tags: str) -> dict[str, str]:
    """The compatibility tags of this config (`latent_size`, `image_size`): what a run is tagged with, and
    what an upstream run must be tagged with to be read (`resolve_run`)."""
    return {tag: str(OmegaConf.select(cfg, COMPAT[tag])) for tag in tags}


def upstream_tags(inputs: dict[str, str]) -> dict[str, str]:
    """The tags that record a run's inputs, `{stage: run id}`, for `upstream`."""
    return {f"upstream.{stage}": run_id for stage, run_id in inputs.items()}


def upstream(run: Run, stage: str) -> str:
    """The id of the `stage` run that `run` read (its `upstream.<stage>` tag), or "" when it read none."""
    return run.data.tags.get(f"upstream.{stage}", "")


def upstream_run(run: Run, stage: str) -> Run:
    """The `stage` run that `run` read; one line when its tag is missing or the run is gone."""
    run_id = upstream(run, stage)
    try:
        return mlflow.get_run(run_id) if run_id else _missing(run, stage)
    except MlflowException as err:
        raise WorldModelError(
            f"run {run.info.run_id} read {stage} run {run_id}, which is not in this store"
        ) from err


def _missing(run: Run, stage: str) -> Run:
    raise WorldModelError(
        f"{run.data.tags.get('stage', 'run')} run {run.info.run_id} records no {stage} run "
        f"(tag upstream.{stage}): was it produced by this version of worldmodel?"
    )


def _how_to_make(stage: str) -> str:
    return f"run `python -m worldmodel stage={stage}` first, or pass inputs.{stage}=<run id>"


def resolve_run(cfg: DictConfig, stage: str, run_id: str | None, tags: dict[str, str]) -> Run:
    """The upstream run of `stage`: the given id (checked); when resuming, the one the resumed run read;
    else the latest FINISHED compatible one. Compatible means the same env, and the `tags` (`compat`)."""
    setup(cfg)
    wanted = {"env": str(cfg.env.id), **tags}
    if not run_id and cfg.inputs.resume:
        with contextlib.suppress(MlflowException):  # stage_run reports the missing run
            run_id = upstream(mlflow.get_run(str(cfg.inputs.resume)), stage)
    if run_id:
        try:
            run = mlflow.get_run(str(run_id))
        except MlflowException as err:
            raise WorldModelError(f"inputs.{stage}={run_id}: no such run in {tracking_uri(cfg)}") from err
        if run.data.tags.get("stage") != stage:
            raise WorldModelError(
                f"inputs.{stage}={run_id} is a '{run.data.tags.get('stage')}' run, not a {stage} run"
            )
        if run.info.status != "FINISHED":
            how = (
                f"resume it with `stage={stage} inputs.resume={run_id}`"
                if stage in RESUMABLE
                else "run it again"
            )
            raise WorldModelError(
                f"inputs.{stage}={run_id} is {run.info.status}, not FINISHED; {how} or pick another run"
            )
        for key, want in wanted.items():
            have = run.data.tags.get(key)
            if have is not None and have != str(want):
                raise WorldModelError(
                    f"inputs.{stage}={run_id} has {key}={have}, this config needs {key}={want}"
                )
        return run
    filters = [f"tags.stage = '{stage}'", "attributes.status = 'FINISHED'"]
    filters += [f"tags.{k} = '{v}'" for k, v in wanted.items()]
    if cfg.mlflow.pipeline:
        filters.append(f"tags.pipeline = '{cfg.mlflow.pipeline}'")
    experiment = mlflow.get_experiment_by_name(str(cfg.mlflow.experiment))
    runs = mlflow.search_runs(
        experiment_ids=[experiment.experiment_id],
        filter_string=" and ".join(filters),
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        text = ", ".join(f"{k}={v}" for k, v in wanted.items())
        raise WorldModelError(
            f"no FINISHED {stage} run with {text} in experiment "
            f"'{cfg.mlflow.experiment}'; {_how_to_make(stage)}"
        )
    return runs[0]


def checkpoint_path(run_id: str, which: str = "best") -> Path:
    """A local path to the `best` or `last` checkpoint of a training run."""
    return artifact_path(run_id, f"{CHECKPOINTS}/{which}.pt")


def checkpoint_of(run_id: str, which: str = "best") -> dict[str, Any]:
    """The `best` or `last` checkpoint of a training run."""
    return load_checkpoint(checkpoint_path(run_id, which), f"run {run_id}")


@dataclass
class World:
    """The learned world a controller lives in: an MDN-RNN run, the VAE run and encode run behind it."""

    rnn_run: Run
    vae_run: Run
    encode_id: str

    def dream_starts(self, cfg: DictConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Where dreams start: the (mu, logvar) of the training episodes' first frames, or nothing
        (`evolve.initial_z=normal`: z ~ N(0, I), as `initial_latents` takes it)."""
        if settings(cfg, Evolve).initial_z == InitialZ.normal:
            return None, None
        return first_frames(self.encode_id, int(cfg.latent.size))

    @property
    def upstream(self) -> dict[str, str]:
        return {
            "train_rnn": self.rnn_run.info.run_id,
            "train_vae": self.vae_run.info.run_id,
            "encode": self.encode_id,
        }


def first_frames(encode_id: str, latent_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu, logvar) of the first frames of an encode run's training episodes: where dreams start."""
    from worldmodel.data import latents
    from worldmodel.data.datasets import episodes_in

    path = artifact_path(encode_id, LATENTS)
    latents.inspect(path, latent_size)
    return latents.first_steps(path, episodes_in(path, "train"))


def resolve_world(cfg: DictConfig) -> World:
    """The MDN-RNN run (`inputs.train_rnn` or the latest compatible) and the VAE it was trained on."""
    rnn_run = resolve_run(cfg, "train_rnn", cfg.inputs.train_rnn, compat(cfg, "latent_size"))
    vae_id = cfg.inputs.train_vae or upstream(rnn_run, "train_vae")
    vae_run = resolve_run(cfg, "train_vae", vae_id, compat(cfg, "latent_size", "image_size"))
    return World(rnn_run, vae_run, upstream_run(rnn_run, "encode").info.run_id)


def check_agent_z(cfg: DictConfig, made_by: Run) -> None:
    """`agent.z` must be what the upstream run was made with (where it records one)."""
    made = made_by.data.params.get("agent.z")
    if made is not None and made != str(cfg.agent.z):
        raise WorldModelError(
            f"config key 'agent.z' is {cfg.agent.z} but {made_by.data.tags.get('stage', 'run')} run "
            f"{made_by.info.run_id} was made with agent.z={made}; set agent.z={made} or use another run"
        )


# Config keys a run may predate, with the behaviour it had before they existed.
PREDATES = {"evolve": {"memory_sigma": 1.0, "mirrored": False}}


def run_settings(run: Run, cls: type[Settings]) -> Settings:
    """The section `cls.SECTION` as `run` was made with it: its logged `config/config.yaml` (YAML, read
    without pickle), keys it predates as `PREDATES` gives them, and keys since removed left out."""
    name, path = cls.SECTION, artifact_path(run.info.run_id, CONFIG)
    try:
        section = OmegaConf.to_container(OmegaConf.load(path)[name])
        if not isinstance(section, dict):
            raise TypeError(f"{name} is a {type(section).__name__}")
    except (OSError, yaml.YAMLError, OmegaConfBaseException, KeyError, TypeError, ValueError) as err:
        raise WorldModelError(
            f"run {run.info.run_id}: {CONFIG} holds no {name} section ({err.__class__.__name__}); "
            "name a run of this version"
        ) from err
    known = {f.name for f in fields(cls)}
    section = {k: v for k, v in section.items() if k in known}
    return settings(OmegaConf.create({name: PREDATES.get(name, {}) | section}), cls)


def agent_files(evolve_run: Run) -> dict[str, str]:
    """Local paths of an evolve run's controller and the VAE and MDN-RNN checkpoints it acts through."""
    return {
        "controller": str(artifact_path(evolve_run.info.run_id, CONTROLLER)),
        "vae": str(checkpoint_path(upstream_run(evolve_run, "train_vae").info.run_id)),
        "rnn": str(checkpoint_path(upstream_run(evolve_run, "train_rnn").info.run_id)),
    }
