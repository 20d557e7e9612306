"""merge: gather the shards of one or more collect runs into one verified dataset.

Every shard is checked (schema, dtypes, shapes, equal settings, every episode present, and every
chunk read back against its checksum) before a byte is written; the dataset is written as
`dataset.h5.partial` and renamed when complete. Shards are never deleted. Episode order: the collect
runs in the order given, episodes by index within each.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import mlflow
from mlflow.entities import Run
from omegaconf import DictConfig, ListConfig

from worldmodel import files, tracking
from worldmodel.config import settings
from worldmodel.config.sections import Merge
from worldmodel.data import rollouts
from worldmodel.data.merge import merge_files
from worldmodel.errors import WorldModelError
from worldmodel.progress import progress_bar
from worldmodel.tracking import lineage

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    settings(cfg, Merge)


def collect_run_ids(cfg: DictConfig) -> list[str | None]:
    given = cfg.inputs.collect
    if given is None:
        return [None]
    if isinstance(given, ListConfig | list):
        return [str(x) for x in given]
    return [str(given)]


def dataset_of(run_id: str) -> tuple[Path, rollouts.RolloutInfo]:
    """A merge run's dataset, inspected, holding the episodes the run recorded writing."""
    path = tracking.artifact_path(run_id, lineage.DATASET)
    info = rollouts.inspect(path, merged=True)
    recorded = mlflow.get_run(run_id).data.metrics.get("episodes")
    if recorded is not None and info.episodes != int(recorded):
        raise WorldModelError(
            f"{path}: {info.episodes} episodes, but merge run {run_id} wrote {int(recorded)}; "
            "the file was replaced: run merge again"
        )
    return path, info


def _check_declared(source: Run, infos: list[rollouts.RolloutInfo]) -> None:
    """The shards hold the episodes, and episodes of the length, that their collect run was asked for."""
    rid, params = source.info.run_id, source.data.params
    expected = int(params.get("collect.episodes", sum(i.episodes for i in infos)))
    found = sum(i.episodes for i in infos)
    if found < expected:
        raise WorldModelError(
            f"collect run {rid} has {found} of its {expected} episodes; "
            f"resume it with `stage=collect inputs.resume={rid}`"
        )
    steps = params.get("collect.max_steps")
    for info in infos:
        if found > expected or (steps is not None and info.steps != int(steps)):
            raise WorldModelError(
                f"{info.path}: {info.episodes} episodes of {info.steps} steps, but collect run {rid} was "
                f"asked for {expected} episodes of {steps} steps; the shard is not this run's: re-collect it"
            )


def run(cfg: DictConfig) -> str:
    compat = tracking.compat(cfg, "image_size")
    sources = [tracking.resolve_run(cfg, "collect", rid, compat) for rid in collect_run_ids(cfg)]
    ids = [r.info.run_id for r in sources]
    if len(set(ids)) != len(ids):
        raise WorldModelError(f"inputs.collect lists a run twice: {ids}")
    infos, owners = _verified_shards(sources)  # everything, before anything is written
    upstream = {"collect": ",".join(ids)}
    tags = tracking.compat(cfg, "image_size")
    hp = settings(cfg, Merge)
    with tracking.stage_run(cfg, "merge", ["merge"], upstream=upstream, tags=tags) as run:
        for rid in ids:
            tracking.log_dataset(rid, lineage.SHARDS, "merge")
        out = tracking.OutputDir()
        # The dataset is about the size of its shards (the same compression): room for it before a byte
        # is written (HDF5 can crash outright when the disk fills under it).
        files.check_room(out.path, sum(os.path.getsize(i.path) for i in infos) + 2**20, "merge")
        start = time.perf_counter()
        with progress_bar(total=sum(i.episodes for i in infos), desc="merge", unit="ep") as bar:
            metrics = merge_files(
                infos,
                owners,
                out / lineage.DATASET,
                hp.val_fraction,
                cfg.seed,
                hp.chunk_frames,
                hp.compression_level,
                bar.update,
            )
        metrics["mb_per_s"] = metrics["bytes"] / 2**20 / (time.perf_counter() - start)
        out.publish(out / lineage.DATASET)
        mlflow.log_metrics(metrics)
        log.info(
            "merge: %d episodes, %.1f MB (%.1f× smaller than raw) → run %s",
            *(metrics["episodes"], metrics["bytes"] / 2**20, metrics["compression_ratio"], run.info.run_id),
        )
        return run.info.run_id


def _verified_shards(sources: list[Run]) -> tuple[list[rollouts.RolloutInfo], list[str]]:
    """Every shard of the collect runs, inspected and read back whole, and the run each came from."""
    infos, owners = [], []
    for source in sources:
        rid = source.info.run_id
        names = sorted(p for p in tracking.list_artifacts(rid, lineage.SHARDS) if p.endswith(".h5"))
        if not names:
            raise WorldModelError(f"collect run {rid} has no shards; re-run it or pick another run")
        run_infos = [rollouts.inspect(tracking.artifact_path(rid, name)) for name in names]
        _check_declared(source, run_infos)  # cheap, before the read-back of every chunk
        for info in progress_bar(run_infos, desc=f"verify {rid[:8]}", unit="shard"):
            rollouts.verify(info.path, f"repair the shard with `stage=collect inputs.resume={rid}`")
        infos += run_infos
        owners += [rid] * len(run_infos)
    rollouts.check_same_settings(infos)
    log.info("merge: %d shards from %d collect run(s) verified", len(infos), len(sources))
    return infos, owners
