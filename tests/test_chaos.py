"""The chaos test: the smoke pipeline on CarRacing, stage by stage, killed with SIGKILL or SIGTERM at 20
seeded random moments across its stages. After each kill the stage is resumed or run again as its
message says (after kill -9, which leaves no message, a resumable stage resumes its dead run, as the
reaper allows). The end must equal an uninterrupted run: the same data, weights, controller, scores and
metrics, with no orphan process, no `.partial` file and no run left RUNNING.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import compose_config, shard_arrays
from tests.test_faults import alive, no_partials, start_app, wait_for
from worldmodel import tracking
from worldmodel.config import RESUMABLE, STAGES

KILLS, SEED = 20, 2026
SMOKE = ("env=carracing",)
TIMING = re.compile(r"per_s|elapsed|seconds|workers_replaced")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def latest(store: Path, stage: str, status: str | None = None):
    tracking.setup(compose_config("experiment=smoke", *SMOKE, f"paths.outputs={store}"))
    where = f"tags.stage = '{stage}'" + (f" and attributes.status = '{status}'" if status else "")
    runs = mlflow.search_runs(
        experiment_names=["CarRacing-v3"],
        filter_string=where,
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


def run_to_end(store: Path, stage: str, *extra: str) -> float:
    start = time.monotonic()
    proc = start_app(store, f"stage={stage}", *SMOKE, *extra)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return time.monotonic() - start


def kill_once(store: Path, stage: str, extra: tuple[str, ...], sig: int, delay: float) -> tuple[bool, str]:
    """Start the stage, send `sig` after `delay` s. (whether it was still running to be killed, output)."""
    proc = start_app(store, f"stage={stage}", *SMOKE, *extra)
    try:
        time.sleep(delay)
        below = descendants(proc.pid)
        if proc.poll() is not None:
            out, _ = proc.communicate()
            assert proc.returncode == 0, out[-3000:]
            return False, out
        os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    wait_for(lambda: not any(alive(p) for p in below), 20, f"the processes of a killed {stage} to exit")
    if sig == signal.SIGTERM and proc.returncode == 128 + signal.SIGTERM:
        assert "Traceback" not in out and "interrupted (SIGTERM)" in out, out[-3000:]
    return True, out


def next_attempt(store: Path, stage: str, sig: int, out: str) -> tuple[str, ...]:
    """What the user is told to do: the message's resume command, or for kill -9 a resumable stage's dead
    run; else the stage from scratch."""
    told = re.search(rf"stage={stage} inputs.resume=(\w+)", out)
    if told:
        return (f"inputs.resume={told.group(1)}",)
    dead = latest(store, stage)
    if sig == signal.SIGKILL and stage in RESUMABLE and dead is not None and dead.info.status == "RUNNING":
        return (f"inputs.resume={dead.info.run_id}",)
    return ()


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda key, obj: found.update({key: obj[()]}) if isinstance(obj, h5py.Dataset) else None)
    return found


def fingerprint(store: Path) -> dict[str, object]:
    """What the pipeline produced: each stage's latest FINISHED run's data, weights and metrics."""
    client, out = MlflowClient(), {}
    for stage in STAGES:
        run = latest(store, stage, "FINISHED")
        rid = run.info.run_id
        for key in run.data.metrics:
            if not TIMING.search(key):
                out[f"{stage}/metric/{key}"] = {m.step: m.value for m in client.get_metric_history(rid, key)}
        if stage == "collect":
            out |= {f"collect/{k}": v for k, v in shard_arrays(rid).items()}
        for name in ("dataset.h5", "latents.h5"):
            if name in tracking.list_artifacts(rid, ""):
                out |= {f"{stage}/{k}": v for k, v in h5_arrays(tracking.artifact_path(rid, name)).items()}
        for name in ("checkpoints/best.pt", "checkpoints/last.pt", "controller.pt"):
            if name in tracking.list_artifacts(rid, name.rpartition("/")[0]):
                state = torch.load(tracking.artifact_path(rid, name), weights_only=True)["state_dict"]
                out |= {f"{stage}/{name}/{k}": v.numpy() for k, v in state.items()}
        for name in ("scores.csv", "cma/history.npz"):
            if name in tracking.list_artifacts(rid, name.rpartition("/")[0]):
                out[f"{stage}/{name}"] = tracking.artifact_path(rid, name).read_bytes()
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


@pytest.mark.slow
def test_twenty_kills_across_the_pipeline_lose_nothing(tmp_path):
    reference, chaos = tmp_path / "reference", tmp_path / "chaos"
    durations = {stage: run_to_end(reference, stage) for stage in STAGES}

    rng = np.random.default_rng(SEED)
    weights = np.array([durations[s] for s in STAGES])
    # two kills in every stage, the other four where the time goes
    extra_kills = rng.choice(len(STAGES), KILLS - 2 * len(STAGES), p=weights / weights.sum())
    plan = sorted([*range(len(STAGES)), *range(len(STAGES)), *extra_kills])
    kills, report = 0, []
    for index, stage in enumerate(STAGES):
        extra: tuple[str, ...] = ()
        for _ in range(plan.count(index)):
            while True:  # a moment that finds the stage still running; a miss draws again
                sig = signal.SIGKILL if rng.random() < 0.5 else signal.SIGTERM
                delay = float(rng.uniform(0.1, 0.95)) * durations[stage]
                killed, out = kill_once(chaos, stage, extra, sig, delay)
                if killed:
                    break
                extra = ()  # it finished: the next attempt is a new run
            kills += 1
            extra = next_attempt(chaos, stage, sig, out)
            report.append(
                f"{stage} {signal.Signals(sig).name} at {delay:.1f}s → {' '.join(extra) or 'again'}"
            )
        run_to_end(chaos, stage, *extra)
    print("\n".join(report))

    assert kills == KILLS
    no_partials(chaos)
    tracking.setup(compose_config("experiment=smoke", *SMOKE, f"paths.outputs={chaos}"))
    left = mlflow.search_runs(
        experiment_names=["CarRacing-v3"], filter_string="attributes.status = 'RUNNING'", output_format="list"
    )
    assert not left, [r.data.tags["stage"] for r in left]
    want = fingerprint(reference)
    assert_same(fingerprint(chaos), want)
