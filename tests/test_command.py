"""`python -m worldmodel.stage=<name> …`: the mission's own command form, for every stage."""

from __future__ import annotations

import csv
import os
import runpy
import subprocess
import sys
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.fingerprint import check_golden
from worldmodel.config import PROJECT_ROOT, STAGES


@pytest.fixture(autouse=True)
def _forget_the_app_run():
    """runpy runs the Hydra app in this process; other tests must not see its HydraConfig."""
    yield
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("stage", [*STAGES, "pipeline"])
def test_module_form_selects_the_stage(stage, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["worldmodel", "experiment=smoke", "--cfg", "job"])
    with _maybe_exit():
        runpy.run_module(f"worldmodel.stage={stage}", run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert f"stage:\n  name: {stage}\n" in out


class _maybe_exit:
    """Hydra may end with SystemExit(0) after printing the config."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        return kind is SystemExit and err.code in (0, None)


def test_the_command_as_written_runs_a_stage(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "worldmodel.stage=collect",
            "env=carracing",
            "experiment=smoke",
            f"paths.outputs={tmp_path}",
            "collect.episodes=2",
            "collect.workers=1",
            "collect.max_steps=10",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list(tmp_path.glob("artifacts/*/artifacts/shards/shard_*.h5"))) == 1


# The form as a user types it, in a subprocess, with real worker processes: each worker is spawned, and
# re-imports the parent's main module, so a worker that ran the app again would fail them all.


def run_form(tmp_path: Path, *args: str, timeout: int = 300) -> None:
    out = subprocess.run(
        [sys.executable, "-m", *args, "experiment=smoke", f"paths.outputs={tmp_path}"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bootstrapping phase" not in out.stderr


def shards(outputs: Path) -> dict[str, np.ndarray]:
    files = sorted(outputs.glob("artifacts/*/artifacts/shards/shard_*.h5"))
    assert len(files) == 2  # experiment=smoke: 4 episodes, 2 a shard
    arrays: dict[str, list[np.ndarray]] = {}
    for file in files:
        with h5py.File(file, "r") as f:
            for key in ("images", "actions", "rewards", "dones", "episode"):
                arrays.setdefault(key, []).append(f[key][:])
    return {k: np.concatenate(v) for k, v in arrays.items()}


def finished_runs(outputs: Path) -> dict[str, list]:
    """The store's runs by stage, each FINISHED, each with `stage=<name>` once in its recorded overrides."""
    mlflow.set_tracking_uri(f"sqlite:///{outputs}/mlflow.db")
    client = MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    by_stage: dict[str, list] = {}
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags
        path = client.download_artifacts(run.info.run_id, "config/hydra/overrides.yaml")
        overrides = yaml.safe_load(Path(path).read_text())
        assert sum(o.startswith("stage=") for o in overrides) == 1, overrides
        assert f"stage={run.data.tags['stage']}" in overrides or "pipeline" in run.data.tags
        by_stage.setdefault(run.data.tags["stage"], []).append(run)
    return by_stage


def test_the_form_collects_with_two_workers_the_data_of_the_package_form(tmp_path):
    form, package = tmp_path / "form", tmp_path / "package"
    run_form(form, "worldmodel.stage=collect", "env=carracing", "collect.workers=2")
    run_form(package, "worldmodel", "stage=collect", "env=carracing", "collect.workers=2")
    a, b = shards(form), shards(package)
    assert a["images"].dtype == np.uint8 and a["images"].shape == (4, 40, 64, 64, 3)
    for key in b:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    (run,) = finished_runs(form)["collect"]
    assert run.data.params["collect.workers"] == "2"


def test_the_form_runs_the_pipeline_then_real_evolve_and_evaluate_with_workers(tmp_path):
    run_form(tmp_path, "worldmodel.stage=pipeline", timeout=600)  # every stage, smoke's 2 workers
    check_golden("carracing", tmp_path)  # what the pipeline computed before the refactor, bit for bit
    rnn = finished_runs(tmp_path)["train_rnn"][0].info.run_id
    run_form(
        tmp_path,
        "worldmodel.stage=evolve",
        "evolve.mode=real",
        "evolve.workers=2",
        "evolve.generations=1",
        "evolve.eval_episodes=0",
        f"inputs.train_rnn={rnn}",
    )
    evolve = next(r for r in finished_runs(tmp_path)["evolve"] if r.data.params["evolve.mode"] == "real")
    evolve_id = evolve.info.run_id
    run_form(tmp_path, "worldmodel.stage=evaluate", "evaluate.workers=2", f"inputs.evolve={evolve_id}")
    runs = finished_runs(tmp_path)
    assert set(runs) == {*STAGES, "pipeline"}
    assert evolve.data.tags["upstream.train_rnn"] == rnn and "fitness/mean" in evolve.data.metrics
    scored = [r for r in runs["evaluate"] if r.data.tags["upstream.evolve"] == evolve_id]
    assert len(scored) == 1 and scored[0].data.metrics["eval/episodes"] == 3


@pytest.mark.slow
def test_a_sweep_is_one_parent_run_whose_jobs_are_named_by_what_differs(tmp_path):
    args = ["-m", "stage=collect", "collect.episodes=1,2", "collect.workers=1", "collect.max_steps=10"]
    run_form(tmp_path, "worldmodel", *args)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (sweep,) = [r for r in runs if r.data.tags["stage"] == "sweep"]
    jobs = [r for r in runs if r.data.tags["stage"] == "collect"]
    assert sweep.info.status == "FINISHED" and "collect.episodes=1,2" in sweep.info.run_name
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {sweep.info.run_id}
    assert {r.info.run_name for r in jobs} == {
        f"collect collect.episodes={n} collect.workers=1 collect.max_steps=10 experiment=smoke"
        for n in (1, 2)
    }
    frames = sorted(r.data.metrics["frames"] for r in jobs)
    assert sweep.data.metrics["jobs/finished"] == 2 and frames == [10, 20]
    assert sweep.data.metrics["jobs/mean/frames"] == 15 and sweep.data.metrics["jobs/std/frames"] == 5


def test_a_sweep_run_carries_its_finished_jobs_metrics_over_the_jobs(tmp_path):
    """`-m … seed=0,1,2`: the score over training seeds, its spread and the table, on the sweep's run;
    the learning curves of the jobs' evolve runs against core-hours."""
    from worldmodel.tracking.sweeps import summarise_jobs

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    here, elsewhere = (client.create_experiment(n, (tmp_path / n).as_uri()) for n in "ab")
    sweep = client.create_run(here).info.run_id  # a sweep over env= spans MLflow experiments
    for eid, score, status in (
        (here, 800.0, "FINISHED"),
        (elsewhere, 900.0, "FINISHED"),
        (here, 1.0, "FAILED"),
    ):
        job = client.create_run(eid, tags={"mlflow.parentRunId": sweep}).info.run_id
        client.log_metric(job, "eval/score_mean", score)
        client.set_terminated(job, status)
    client.create_run(elsewhere)  # not a job of this sweep
    job = client.search_runs([here], "metrics.`eval/score_mean` = 800")[0]
    start = job.info.start_time
    evolve = client.create_run(
        here, start_time=start, tags={"pipeline": job.info.run_id, "stage": "evolve", "cores": "2"}
    )
    for gen in range(3):  # one generation every half hour on 2 cores: 1 core-hour a generation
        client.log_metric(evolve.info.run_id, "fitness/mean", 100.0 * gen, start + (gen + 1) * 1_800_000, gen)
    client.log_metric(evolve.info.run_id, "real/check_score", 750.0, start + 3_600_000, 1)

    summarise_jobs(client, sweep)

    metrics = client.get_run(sweep).data.metrics
    assert metrics["jobs/finished"] == 2, "the failed job does not count"
    assert metrics["jobs/mean/eval/score_mean"] == 850 and metrics["jobs/std/eval/score_mean"] == 50
    assert (metrics["jobs/min/eval/score_mean"], metrics["jobs/max/eval/score_mean"]) == (800, 900)
    table = Path(client.download_artifacts(sweep, "jobs.csv", str(tmp_path))).read_text().splitlines()
    assert table[0] == "run_id,run_name,eval/score_mean" and len(table) == 3
    with open(client.download_artifacts(sweep, "learning_curves.csv", str(tmp_path))) as f:
        curve = list(csv.DictReader(f))
    assert [float(r["core_hours"]) for r in curve] == [1.0, 2.0, 3.0]
    assert [float(r["fitness/mean"]) for r in curve] == [0.0, 100.0, 200.0]
    assert [r["real/check_score"] for r in curve] == ["", "750.0", ""]
    assert {r["eval/score_mean"] for r in curve} == {"800.0"}, "the job's score, for its star"
    png = client.download_artifacts(sweep, "learning_curves.png", str(tmp_path))
    assert Image.open(png).size == (800, 500)


def test_help_lists_the_stages_with_what_they_read_and_write():
    out = subprocess.run(
        [sys.executable, "-m", "worldmodel", "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0
    for stage in [*STAGES, "pipeline"]:
        assert f"\n  {stage} " in out.stdout, stage
    assert "train_rnn  an encode run" in out.stdout and "Tab completion" in out.stdout
    assert "train_vae:\n  epochs" not in out.stdout, "no config dump"


@pytest.mark.slow
def test_an_optuna_sweep_tunes_m_and_its_best_trial_is_in_mlflow(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="needs the optuna extra: make setup-optuna"
    )

    def app(*args: str) -> None:
        run_form(tmp_path, "worldmodel", *args, timeout=600)

    app("stage=pipeline", "pipeline.stages=[collect,encode]")
    app(
        "-m",
        "stage=train_rnn",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.direction=minimize",
        "hydra.sweeper.sampler.seed=0",
        "train_rnn.hidden=choice(16,32)",
        "train_rnn.dropout=interval(0.0,0.2)",
    )
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (sweep,) = [r for r in runs if r.data.tags["stage"] == "sweep"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    assert len(trials) == 3 and all(r.data.tags["stage"] == "train_rnn" for r in trials)
    best = min(trials, key=lambda r: r.data.metrics["best_val_nll"])
    assert sweep.data.metrics["best/value"] == best.data.metrics["best_val_nll"], "the app returned it"
    assert sweep.data.params["best.train_rnn.hidden"] == best.data.params["train_rnn.hidden"]


@pytest.mark.slow
def test_the_wheel_carries_its_configs_and_runs_from_any_directory(tmp_path):
    """Built and installed, not editable: the configs come from inside the package, outputs land in
    the working directory."""
    dist, site, work = tmp_path / "dist", tmp_path / "site", tmp_path / "work"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dist), str(PROJECT_ROOT)], check=True, timeout=300)
    (wheel,) = dist.glob("worldmodel-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    assert (site / "worldmodel" / "conf" / "experiment" / "smoke.yaml").is_file()
    work.mkdir()
    args = ["stage=pipeline", "experiment=smoke", "pipeline.stages=[collect,merge]"]
    out = subprocess.run(
        [sys.executable, "-m", "worldmodel", *args],
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (work / "outputs" / "mlflow.db").is_file()
    assert list((work / "outputs" / "artifacts").glob("*/artifacts/dataset.h5")), "runs write under the cwd"
