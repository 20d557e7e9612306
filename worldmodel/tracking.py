"""MLflow conventions shared by every stage.

- Store: `mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else SQLite under `paths.outputs`, with
  artifacts under `paths.outputs/artifacts`.
- One experiment per env; runs tagged with stage, env, pipeline, git commit and upstream run ids.
- Params: the config sections the stage reads, flattened; the full config and `.hydra/` as artifacts.
- A run that raises ends FAILED (KILLED on Ctrl-C or SIGTERM), so it is never picked up as an input.
- A live run carries its host and pid and a heartbeat tag; resume refuses a run that is still alive, and
  a new run of a stage marks the dead RUNNING runs of that stage (kill -9, power loss) KILLED and
  removes their partial files.
- Inputs are found by explicit run id or as the latest FINISHED compatible run of the upstream stage;
  a resumed run keeps the upstream runs it started with unless another is named.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from filelock import FileLock
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from worldmodel import files
from worldmodel.config import PROJECT_ROOT, RESUMABLE, flatten
from worldmodel.errors import WorldModelError, one_line

log = logging.getLogger(__name__)
# MLflow's own download bars would interleave with ours.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# mlflow.set_tracking_uri exports the URI as $MLFLOW_TRACKING_URI (for subprocesses); a value we put
# there ourselves is not the user's choice and must not outlive a config that points elsewhere.
_exported: str | None = None


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.mlflow.tracking_uri:
        return str(cfg.mlflow.tracking_uri)
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env and from_env != _exported:
        return from_env
    return f"sqlite:///{Path(cfg.paths.outputs).resolve() / 'mlflow.db'}"


def setup(cfg: DictConfig) -> str:
    """Point MLflow at the store and select the experiment; returns the experiment id."""
    global _exported
    uri = tracking_uri(cfg)
    if uri != os.environ.get("MLFLOW_TRACKING_URI"):
        _exported = uri
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        # Jobs of a parallel sweep would otherwise race to create the tables of a new store.
        with FileLock(db.with_name(db.name + ".lock")):
            _probe(uri)
            return _select_experiment(cfg, uri)
    _probe(uri)
    return _select_experiment(cfg, uri)


_answered: set[str] = set()
# For the first request only: MLflow's defaults (7 retries, 120 s each) take minutes to give up.
_PROBE_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _probe(uri: str) -> None:
    """One cheap request to the store, so that a server that does not answer, or a store MLflow
    refuses, fails in one line within seconds and before any work."""
    if uri in _answered:
        return
    scheme = urlparse(uri).scheme
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise WorldModelError(
            f"tracking URI {uri} is a file store, which MLflow 3 refuses; use a database "
            "(sqlite:///<dir>/mlflow.db; unset, mlflow.tracking_uri means the store under paths.outputs)"
        )
    saved = {k: os.environ.get(k) for k in _PROBE_SETTINGS}
    os.environ.update(_PROBE_SETTINGS)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # requests' errors, MlflowException, sqlite's OperationalError
        raise WorldModelError(
            f"tracking URI {uri} does not answer ({one_line(err, 120)}…); start its server, or point "
            "mlflow.tracking_uri (or $MLFLOW_TRACKING_URI) at a store that answers"
        ) from err
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _answered.add(uri)


# MLflow 3's UI asks for an experiment's type until it has one: this is classic model training.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def _select_experiment(cfg: DictConfig, uri: str) -> str:
    name = str(cfg.mlflow.experiment)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        # A local store keeps artifacts beside it; a server decides for itself.
        location = None
        if uri.startswith("sqlite:") or uri.startswith("file:"):
            location = (Path(cfg.paths.outputs).resolve() / "artifacts").as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException:  # created meanwhile by a parallel job of a sweep
            pass
        experiment = mlflow.get_experiment_by_name(name)
    for key, value in EXPERIMENT_TAGS.items():
        if key not in experiment.tags:  # one made before worldmodel set it
            MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


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
        if old is not None and old != value and key not in may_change:
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
    params = {k: str(v) for s in sections for k, v in flatten(cfg[s], prefix=f"{s}.").items()}
    if "seed" in cfg:
        params["seed"] = str(cfg.seed)
    if resume:
        try:
            previous = mlflow.get_run(resume)
        except MlflowException as err:
            raise WorldModelError(f"inputs.resume={resume}: no such run in {tracking_uri(cfg)}") from err
        _check_resume(previous, stage, params, may_change, repairable)
        params = {k: v for k, v in params.items() if k not in previous.data.params}
    else:
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
        all_tags = {
            "stage": stage,
            "env": str(cfg.env.id),
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "backend": str(cfg.backend.name),
            **(tags or {}),
        }
        if cfg.mlflow.pipeline:
            all_tags["pipeline"] = str(cfg.mlflow.pipeline)
        if not nested and not resume and os.environ.get("WORLDMODEL_SWEEP_RUN"):  # a job of a sweep
            all_tags["mlflow.parentRunId"] = os.environ["WORLDMODEL_SWEEP_RUN"]
        if (commit := git_commit()) != "unknown":  # MLflow's own tag; it sets it only for a script's repo
            all_tags["mlflow.source.git.commit"] = commit
        for key, run_id in (upstream or {}).items():
            all_tags[f"upstream.{key}"] = run_id
        mlflow.set_tags(all_tags)
        if params:
            mlflow.log_params(params)
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
        hydra_dir = _hydra_output_dir()
        if hydra_dir is not None and (hydra_dir / ".hydra").is_dir():
            mlflow.log_artifacts(str(hydra_dir / ".hydra"), "config/hydra")
        yield mlflow.get_run(active.info.run_id)
        if hydra_dir is not None and (hydra_dir / f"{stage}.log").is_file():
            mlflow.log_artifact(str(hydra_dir / f"{stage}.log"), "logs")


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
REPORT = ("scores.csv", "score_histogram.png", "gifs/*.gif")
WRITES = {
    "collect": ("shards/shard_*.h5",),
    "merge": ("dataset.h5",),
    "encode": ("latents.h5",),
    "train_vae": ("checkpoints/best.pt", "checkpoints/last.pt"),
    "train_rnn": ("checkpoints/best.pt", "checkpoints/last.pt"),
    "evolve": ("controller.pt", "cma/history.npz", *REPORT),
    "evaluate": REPORT,
    "dream": ("gifs/*.gif", "fidelity/*.png", "fidelity/*.csv"),
    "play": ("play.gif",),
    "pipeline": (),
    "sweep": (),
}


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


# ---- artifacts ------------------------------------------------------------------------------------


def local_artifact_dir(subpath: str) -> tuple[Path, bool]:
    """A local directory for the active run's artifacts under `subpath`.

    For a local store this *is* the run's artifact directory (large files are written once, in place)
    and the flag is True; for a remote store it is a staging directory to `publish` from.
    """
    uri = mlflow.get_artifact_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path)) / subpath
        in_place = True
    else:
        path = Path(os.environ.get("TMPDIR", "/tmp")) / "worldmodel-staging" / mlflow.active_run().info.run_id
        path = path / subpath
        in_place = False
    path.mkdir(parents=True, exist_ok=True)
    return path, in_place


@contextlib.contextmanager
def artifact(name: str) -> Iterator[Path]:
    """A path to write the active run's artifact `name` (e.g. "scores.csv", "gifs/best.gif") to. The file
    is written under a `.partial` name (its extension kept, for writers that go by it) and becomes the
    artifact only when the block completes; on an error nothing is left under the final name."""
    subdir, _, filename = name.rpartition("/")
    directory, in_place = local_artifact_dir(subdir)
    with files.atomic(directory / filename) as partial:
        yield partial
    publish(directory / filename, subdir, in_place)


def publish(file: Path, subpath: str, in_place: bool) -> None:
    """Make a finished file visible as an artifact (a no-op where it was written in place)."""
    if not in_place:
        mlflow.log_artifact(str(file), subpath)


def artifact_path(run_id: str, path: str) -> Path:
    """A local path to an artifact of a run: in place for a local store, downloaded otherwise."""
    try:
        # By URI, not run id: a local store then answers with the file in place instead of a copy.
        uri = mlflow.get_run(run_id).info.artifact_uri.rstrip("/")
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{path}" if path else uri))
    except (MlflowException, OSError) as err:
        raise WorldModelError(
            f"run {run_id} has no artifact '{path}' ({err.__class__.__name__}); "
            "was it produced by this version of worldmodel?"
        ) from err


def log_dataset(producer: str, name: str, context: str) -> None:
    """Record artifact `name` of run `producer` as an input of the active run (`mlflow.log_input`), so
    the run page lists it under Datasets, with its source, a digest and the producing run."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    uri = f"{mlflow.get_run(producer).info.artifact_uri.rstrip('/')}/{name}"
    try:
        with warnings.catch_warnings():  # a local path reads as two kinds of local source
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(uri)
    except MlflowException:  # mlflow-artifacts:/ (a team server) has no resolver of its own
        source = HTTPDatasetSource(uri)
    digest = hashlib.sha256(f"{producer}/{name}".encode()).hexdigest()[:16]  # written once per run
    dataset = MetaDataset(source, name=f"{name.rpartition('/')[2]}@{producer[:8]}", digest=digest)
    mlflow.log_input(dataset, context=context, tags={"producer_run": producer, "artifact": name})


def list_artifacts(run_id: str, path: str) -> list[str]:
    try:
        return [a.path for a in MlflowClient().list_artifacts(run_id, path) if not a.is_dir]
    except MlflowException as err:  # e.g. a folder symlinked out of the store, which MLflow refuses
        raise WorldModelError(
            f"run {run_id}: cannot list its artifacts '{path}' ({one_line(err, 120)})"
        ) from err


# ---- resolving inputs -----------------------------------------------------------------------------


def _upstream_of(run_id: str, stage: str) -> str | None:
    try:
        return mlflow.get_run(run_id).data.tags.get(f"upstream.{stage}")
    except MlflowException:
        return None  # stage_run reports the missing run


def _how_to_make(stage: str) -> str:
    return f"run `python -m worldmodel stage={stage}` first, or pass inputs.{stage}=<run id>"


def resolve_run(cfg: DictConfig, stage: str, run_id: str | None, compat: dict[str, str]) -> Run:
    """The upstream run of `stage`: the given id (checked); when resuming, the one the resumed run read;
    else the latest FINISHED compatible one. Compatible means the same env, and the `compat` tags."""
    setup(cfg)
    compat = {"env": str(cfg.env.id), **compat}
    if not run_id and cfg.inputs.resume:
        run_id = _upstream_of(str(cfg.inputs.resume), stage)
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
        for key, want in compat.items():
            have = run.data.tags.get(key)
            if have is not None and have != str(want):
                raise WorldModelError(
                    f"inputs.{stage}={run_id} has {key}={have}, this config needs {key}={want}"
                )
        return run
    filters = [f"tags.stage = '{stage}'", "attributes.status = 'FINISHED'"]
    filters += [f"tags.{k} = '{v}'" for k, v in compat.items()]
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
        wanted = ", ".join(f"{k}={v}" for k, v in compat.items())
        raise WorldModelError(
            f"no FINISHED {stage} run with {wanted} in experiment "
            f"'{cfg.mlflow.experiment}'; {_how_to_make(stage)}"
        )
    return runs[0]
