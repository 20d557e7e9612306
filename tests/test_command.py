"""`python -m worldmodel.stage=<name> …`: the mission's own command form, for every stage."""

from __future__ import annotations

import runpy
import subprocess
import sys

import pytest
from hydra.core.hydra_config import HydraConfig

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
