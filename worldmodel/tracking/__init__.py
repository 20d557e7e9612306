"""MLflow conventions shared by every stage, in four layers: the store (`store`), the run of a stage
(`runs`), its files (`artifacts`) and the links between runs (`lineage`). The names below are the
package's interface; stages use them as `tracking.<name>`."""

from worldmodel.tracking.artifacts import (
    OutputDir,
    artifact,
    artifact_path,
    list_artifacts,
    log_dataset,
    log_model,
)
from worldmodel.tracking.lineage import (
    World,
    agent_files,
    check_agent_z,
    checkpoint_of,
    checkpoint_path,
    compat,
    first_frames,
    resolve_run,
    resolve_world,
    run_settings,
    upstream,
    upstream_run,
)
from worldmodel.tracking.runs import run_name, run_status, stage_run
from worldmodel.tracking.store import setup, tracking_uri

__all__ = [
    "OutputDir",
    "World",
    "agent_files",
    "artifact",
    "artifact_path",
    "check_agent_z",
    "checkpoint_of",
    "checkpoint_path",
    "compat",
    "first_frames",
    "list_artifacts",
    "log_dataset",
    "log_model",
    "resolve_run",
    "resolve_world",
    "run_settings",
    "run_name",
    "run_status",
    "setup",
    "stage_run",
    "tracking_uri",
    "upstream",
    "upstream_run",
]
