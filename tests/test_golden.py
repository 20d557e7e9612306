"""The smoke pipeline computes, bit for bit, what it computed before the last refactor: the data,
checkpoints, metrics and scores of every stage (`tests/fingerprint.py`; CartPole's and Doom's checks are
in their smoke pipeline tests)."""

from tests.conftest import compose_config
from tests.fingerprint import check_golden, fresh_torch
from worldmodel.stages import run_stage


def test_the_carracing_smoke_pipeline_computes_what_its_golden_fingerprint_holds(tmp_path):
    with fresh_torch():
        parent = run_stage(compose_config("experiment=smoke", f"paths.outputs={tmp_path}", "stage=pipeline"))
    check_golden("carracing", tmp_path, parent)
