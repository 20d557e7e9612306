"""The run of a stage: start or resume it, tag and parametrise it, keep its heartbeat, end it FINISHED,
FAILED or KILLED, and reap the runs that a dead process left RUNNING.

- Params: the config sections the stage reads, flattened; the full config and `.hydra/` as artifacts.
- A run that raises ends FAILED (KILLED on Ctrl-C or SIGTERM), so it is never picked up as an input.
- A live run carries its host and pid and a heartbeat tag; resume refuses a run that is still alive, and
  a new run of a stage marks the dead RUNNING runs of that stage (kill -9, power loss) KILLED and
  removes their partial files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from worldmodel import files
from worldmodel.config import PROJECT_ROOT, flatten
from worldmodel.errors import WorldModelError
from worldmodel.tracking.lineage import CONFIG, WRITES, upstream_tags
from worldmodel.tracking.store import setup, tracking_uri

log = logging.getLogger(__name__)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Overrides that say where, not what: left out of run names.
_PLUMBING = ("paths.", "inputs.", "mlflow.", "hydra.", "stage=", "policy.run_id", "policy.paths")


def run_name(stage: str, overrides: Sequence[str] | None = None) -> str:
    """The stage and the command-line overrides (Hydra's, by default) that make this run differ
    (`train_vae latent=z16 train_vae.lr=0.0003`), so the runs of a sweep tell themselves apart."""
    from hydra.core.hydra_config import HydraConfig

    if overrides is None:
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    said = [o.lstrip("+~") for o in overrides]
    said = [o for o in said if not o.startswith(_PLUMBING)]
    name = " ".join([stage, *said])
    return name if len(name) <= 120 else name[:119] + "…"


def _hydra_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    out = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", throw_on_missing=False)
    return Path(out) if out else None  # unset when the app only printed its config (--cfg)


def _check_resume(
    run: Run, stage: str, params: dict[str, str], may_change: Sequence[str], repairable: bool
) -> None:
    if run.data.tags.get("stage") != stage:
        raise WorldModelError(
            f"inputs.resume={run.info.run_id} is a '{run.data.tags.get('stage')}' run, not a {stage} run"
        )
    alive = _alive(run)
    if alive:
        raise WorldModelError(
            f"inputs.resume={run.info.run_id} is still running ({alive}); stop that process first"
        )
    if run.info.status == "FINISHED" and not repairable:
        raise WorldModelError(f"inputs.resume={run.info.run_id} already FINISHED; nothing to resume")
    for key, value in params.items():
        old = run.data.params.get(key)
        moved = key.endswith("_target_")  # a class path names the same class after a move
        if old is not None and old != value and key not in may_change and not moved:
            raise WorldModelError(
                f"inputs.resume={run.info.run_id}: '{key}' was {old} in that run, now "
                f"{value}; resume with the same settings"
            )


@contextlib.contextmanager
def stage_run(
    cfg: DictConfig,
    stage: str,
    sections: Sequence[str],
    upstream: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    resume: str | None = None,
    may_change: Sequence[str] = (),
    repairable: bool = False,
) -> Iterator[Run]:
    """Start (or resume) the MLflow run of one stage; end it FINISHED, FAILED or KILLED. A `repairable`
    stage may also reopen a FINISHED run (collect re-collects its missing or damaged shards)."""
    experiment_id = setup(cfg)
    params = _params(cfg, sections, stage, resume, may_change, repairable)
    if not resume:
        _reap_dead_runs(experiment_id, stage)
    nested = mlflow.active_run() is not None  # inside stage=pipeline: a child of the parent run
    uri = tracking_uri(cfg)  # a SQLite store shares its disk with the artifacts; hold room for its writes
    reserve = (
        files.Reserve(Path(uri.removeprefix("sqlite:///")).parent) if uri.startswith("sqlite:///") else None
    )
    active = mlflow.start_run(
        run_id=resume,
        nested=nested,
        run_name=None if resume else run_name(stage),
        log_system_metrics=bool(cfg.mlflow.system_metrics),
    )
    with run_status(reserve), _heartbeat(active.info.run_id):
        mlflow.set_tags(_tags(cfg, stage, tags or {}, upstream or {}, own_parent=not nested and not resume))
        if params:
            mlflow.log_params(params)
        hydra_dir = _log_config(cfg)
        yield mlflow.get_run(active.info.run_id)
        if hydra_dir is not None and (hydra_dir / f"{stage}.log").is_file():
            mlflow.log_artifact(str(hydra_dir / f"{stage}.log"), "logs")


def _params(
    cfg: DictConfig,
    sections: Sequence[str],
    stage: str,
    resume: str | None,
    may_change: Sequence[str],
    repairable: bool,
) -> dict[str, str]:
    """The sections' settings, flattened; for a resumed run, checked against its own and only the new."""
    params = {k: str(v) for s in sections for k, v in flatten(cfg[s], prefix=f"{s}.").items()}
    if "seed" in cfg:
        params["seed"] = str(cfg.seed)
    if not resume:
        return params
    try:
        previous = mlflow.get_run(resume)
    except MlflowException as err:
        raise WorldModelError(f"inputs.resume={resume}: no such run in {tracking_uri(cfg)}") from err
    _check_resume(previous, stage, params, may_change, repairable)
    return {k: v for k, v in params.items() if k not in previous.data.params}


def _tags(
    cfg: DictConfig, stage: str, tags: dict[str, str], upstream: dict[str, str], own_parent: bool
) -> dict[str, str]:
    """What a run is, where it runs, and what it read. `own_parent`: a run that is not a pipeline's child
    nor resumed, which a sweep's parent run adopts."""
    all_tags = {
        "stage": stage,
        "env": str(cfg.env.id),
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "backend": str(cfg.backend.name),
        "cores": str(len(os.sched_getaffinity(0))),  # what a sweep's learning curves count core-hours by
        **tags,
    }
    if cfg.mlflow.pipeline:
        all_tags["pipeline"] = str(cfg.mlflow.pipeline)
    if own_parent and os.environ.get("WORLDMODEL_SWEEP_RUN"):  # a job of a sweep
        all_tags["mlflow.parentRunId"] = os.environ["WORLDMODEL_SWEEP_RUN"]
    if (commit := git_commit()) != "unknown":  # MLflow's own tag; it sets it only for a script's repo
        all_tags["mlflow.source.git.commit"] = commit
    return all_tags | upstream_tags(upstream)


def _log_config(cfg: DictConfig) -> Path | None:
    """The resolved config, and Hydra's `.hydra/` folder; returns Hydra's output folder, if any."""
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), CONFIG)
    hydra_dir = _hydra_output_dir()
    if hydra_dir is not None and (hydra_dir / ".hydra").is_dir():
        mlflow.log_artifacts(str(hydra_dir / ".hydra"), "config/hydra")
    return hydra_dir


HEARTBEAT_S = 30.0  # a RUNNING run whose heartbeat is older than 3 of these is taken for dead


@contextlib.contextmanager
def _heartbeat(run_id: str) -> Iterator[None]:
    """Refresh the run's `heartbeat` tag (unix time) every HEARTBEAT_S from a background thread."""
    stop = threading.Event()
    client = MlflowClient()

    def beat() -> None:
        while True:
            try:
                client.set_tag(run_id, "heartbeat", f"{time.time():.0f}")
            except Exception as err:  # a missed beat is not worth failing a stage for
                log.debug("heartbeat of %s failed: %s", run_id, err)
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="mlflow-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _alive(run: Run) -> str | None:
    """Why a RUNNING run is still alive (its process exists on this host, or its heartbeat is recent),
    or None when it is not running or evidently dead."""
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    if tags.get("host") == socket.gethostname() and tags.get("pid", "").isdigit():
        # On this host the process itself decides: a busy process is never taken for dead.
        pid = int(tags["pid"])
        return f"process {pid} on this host" if files.process_exists(pid) else None
    age = time.time() - float(tags.get("heartbeat", 0))
    if age < 3 * HEARTBEAT_S:
        return f"on {tags.get('host', 'another host')}, heartbeat {age:.0f} s ago"
    return None


# What each stage writes itself, relative to its artifact root (globs): the reaper removes the partial
# files of exactly these names (files.partial_of), and no other file.
def _reap_dead_runs(experiment_id: str, stage: str) -> None:
    """Mark RUNNING runs of `stage` whose process is gone KILLED, and remove their partial files (a
    stage killed with -9 could do neither), so they are neither mistaken for live runs nor leave
    half-written files behind for good. Resumable stages still resume them."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.stage = '{stage}' and attributes.status = 'RUNNING'",
        output_format="list",
    )
    client = MlflowClient()
    for run in runs:
        if _alive(run):
            continue
        parsed = urlparse(run.info.artifact_uri)
        if parsed.scheme in ("", "file"):
            files.remove_partials(Path(unquote(parsed.path)), WRITES[stage])
        client.set_terminated(run.info.run_id, "KILLED")
        client.set_tag(run.info.run_id, "killed_reason", "its process was gone")
        log.warning(
            "run %s of %s was left RUNNING by a process that is gone: marked KILLED", run.info.run_id, stage
        )


@contextlib.contextmanager
def run_status(reserve: files.Reserve | None = None) -> Iterator[None]:
    """End the active run FINISHED, or KILLED on Ctrl-C and FAILED on any other exception, so that an
    interrupted run is never picked up as an input. The `reserve` is given back first, so that a full
    disk still has room for the store to record the end."""
    run_id = mlflow.active_run().info.run_id
    try:
        yield
    except KeyboardInterrupt as err:
        _release(reserve)
        mlflow.end_run("KILLED")
        if not hasattr(err, "run_id"):  # the innermost run: the one to resume
            err.run_id = run_id
        raise
    except BaseException:
        _release(reserve)
        mlflow.end_run("FAILED")
        raise
    _release(reserve)
    mlflow.end_run("FINISHED")


def _release(reserve: files.Reserve | None) -> None:
    if reserve is not None:
        reserve.release()
