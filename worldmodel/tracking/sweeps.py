"""What a sweep's parent run shows at the end: its finished jobs' metrics over the jobs, and the jobs'
learning curves against core-hours (`-m … evolve.popsize=12,24,48`: which setting learns fastest per
core-hour, in one picture)."""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CURVE, CHECK = "fitness/mean", "real/check_score"  # evolve's per-generation metrics that are plotted
CURVES_PNG, CURVES_CSV = "learning_curves.png", "learning_curves.csv"


def summarise_jobs(client: Any, sweep_id: str) -> None:
    """Log each metric of the sweep's FINISHED jobs over the jobs on the sweep's run, with `jobs.csv`,
    and the learning curves of the jobs' evolve runs."""
    from mlflow.entities import Metric

    experiments = [e.experiment_id for e in client.search_experiments()]
    jobs = client.search_runs(
        experiments, f"tags.mlflow.parentRunId = '{sweep_id}' and attributes.status = 'FINISHED'"
    )
    now = int(time.time() * 1000)
    summary = [Metric("jobs/finished", len(jobs), now, 0)]
    keys = sorted({k for job in jobs for k in job.data.metrics})
    for key in keys:
        values = np.array([job.data.metrics[key] for job in jobs if key in job.data.metrics])
        for name in ("mean", "std", "min", "max"):  # std over the jobs, as eval/score_std over episodes
            summary.append(Metric(f"jobs/{name}/{key}", float(getattr(values, name)()), now, 0))
    client.log_batch(sweep_id, metrics=summary)
    if not jobs:
        return
    jobs = sorted(jobs, key=lambda j: j.info.start_time)
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["run_id", "run_name", *keys])
    for job in jobs:
        writer.writerow([job.info.run_id, job.info.run_name, *(job.data.metrics.get(k, "") for k in keys)])
    client.log_text(sweep_id, table.getvalue(), "jobs.csv")
    rows = [row for job in jobs for row in curve_rows(client, experiments, job)]
    if rows:
        log_curves(client, sweep_id, rows)


def curve_rows(client: Any, experiments: list[str], job: Any) -> list[dict[str, Any]]:
    """One row per generation of each evolve run of `job` (the job itself, or a pipeline's evolve
    children, rounds included): its core-hours so far, the population's mean fitness and any real check."""
    if job.data.tags.get("stage") == "evolve":
        runs = [job]
    else:
        query = f"tags.pipeline = '{job.info.run_id}' and tags.stage = 'evolve'"
        runs = client.search_runs(experiments, query, order_by=["attributes.start_time ASC"])
    rows = []
    for k, run in enumerate(runs):
        cores = int(run.data.tags.get("cores") or os.cpu_count() or 1)
        checks = {m.step: m.value for m in client.get_metric_history(run.info.run_id, CHECK)}
        for m in sorted(client.get_metric_history(run.info.run_id, CURVE), key=lambda m: m.step):
            hours = max(m.timestamp - run.info.start_time, 0) / 3.6e6
            rows.append(
                {
                    "job": job.info.run_name or job.info.run_id,
                    "evolve": k,
                    "evolve_run_id": run.info.run_id,
                    "generation": m.step,
                    "core_hours": hours * cores,
                    CURVE: m.value,
                    CHECK: checks.get(m.step, ""),
                    "eval/score_mean": job.data.metrics.get("eval/score_mean", ""),
                }
            )
    return rows


def log_curves(client: Any, sweep_id: str, rows: list[dict[str, Any]]) -> None:
    """The curves as a PNG (each job one colour; real checks as dots, the job's score over its unseen
    tracks as a star at its end) and the table behind them, on the sweep's run."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for i, job in enumerate(dict.fromkeys(r["job"] for r in rows)):
        colour = f"C{i % 10}"
        mine = [r for r in rows if r["job"] == job]
        for k in dict.fromkeys(r["evolve"] for r in mine):
            part = [r for r in mine if r["evolve"] == k]
            ax.plot(
                [r["core_hours"] for r in part],
                [r[CURVE] for r in part],
                color=colour,
                label=job if k == mine[0]["evolve"] else None,
            )
            checked = [r for r in part if r[CHECK] != ""]
            ax.scatter([r["core_hours"] for r in checked], [r[CHECK] for r in checked], color=colour, s=12)
        if mine[-1]["eval/score_mean"] != "":
            ax.scatter(
                [mine[-1]["core_hours"]], [mine[-1]["eval/score_mean"]], color=colour, marker="*", s=120
            )
    ax.set_xlabel("core-hours of evolve")
    ax.set_ylabel("mean fitness (line), real score (• check, ★ evaluate)")
    ax.set_title("learning curves of the sweep's jobs")
    ax.legend(fontsize="small")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        png, table = Path(tmp) / CURVES_PNG, Path(tmp) / CURVES_CSV
        fig.savefig(png, format="png")
        with table.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        client.log_artifact(sweep_id, str(png))
        client.log_artifact(sweep_id, str(table))
    plt.close(fig)
