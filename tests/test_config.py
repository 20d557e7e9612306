import importlib.util
import subprocess
import sys

import mlflow
import pytest

from tests.conftest import compose_config
from worldmodel import tracking
from worldmodel.config import CONFIG_DIR, PROJECT_ROOT
from worldmodel.errors import WorldModelError
from worldmodel.stages import run_stage

GROUPS = ["stage", "env", "policy", "latent", "device", "backend", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    assert options(group), f"group {group} has no options"
    for option in options(group):
        if (group, option) == ("experiment", "tune_rnn") and NO_OPTUNA:
            continue  # its sweeper is the optuna extra's (make setup-optuna)
        cfg = compose_config(f"{group}={option}")
        if group == "stage":
            assert cfg.stage.name == option
        if group == "latent":
            assert cfg.latent.size == int(option.removeprefix("z"))
        if group == "device":
            assert cfg.device.type == option
        if group in ("policy", "backend"):
            assert cfg[group].name == option
        assert cfg.paths.outputs.startswith(str(PROJECT_ROOT))


def test_stage_groups_are_complete():
    assert options("stage") == sorted(
        [
            "collect",
            "merge",
            "train_vae",
            "encode",
            "train_rnn",
            "evolve",
            "evaluate",
            "dream",
            "pipeline",
            "play",
        ]
    )
    assert {"smoke", "laptop", "workstation", "iterative", "paper"} <= set(options("experiment"))


NO_DOOM = importlib.util.find_spec("vizdoom") is None
NO_OPTUNA = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None
DOOM = pytest.param("doom", marks=pytest.mark.skipif(NO_DOOM, reason="needs the doom extra: make setup-doom"))


@pytest.mark.parametrize("preset", ["laptop", "workstation", "iterative", DOOM, "paper"])
def test_presets_validate_and_end_with_evaluate_on_enough_tracks(preset):
    from worldmodel.stages import pipeline

    cfg = compose_config(f"experiment={preset}", "stage=pipeline")
    pipeline.validate(cfg)
    if preset != "iterative":
        assert cfg.evaluate.episodes == 100
    assert "evaluate" in pipeline.stage_range(cfg)


def test_defaults_follow_the_design():
    cfg = compose_config()
    assert (cfg.env.id, cfg.env.image_size, cfg.env.crop.bottom) == ("CarRacing-v3", 64, 12)
    assert cfg.policy.name == "pseudo_random" and cfg.latent.size == 32
    assert cfg.collect.max_steps == 1000


def test_experiment_smoke_overrides_defaults():
    cfg = compose_config("experiment=smoke")
    assert cfg.collect.episodes < compose_config().collect.episodes


@pytest.mark.parametrize(
    "override, key",
    [
        ("collect.episodes=0", "collect.episodes"),
        ("collect.workers=-2", "collect.workers"),
        ("env.image_size=0", "env.image_size"),
        ("policy.probs=[0.5,0.5,0.5,0.5]", "policy.probs"),
        ("seed=-1", "seed"),
        ("backend._target_=nowhere.Pool", "backend._target_"),
        ("inputs.collect=[]", "inputs.collect"),
        ("inputs.train_vae=[a,b]", "inputs.train_vae"),
    ],
)
def test_bad_values_fail_before_work_naming_the_key(tmp_path, override, key):
    cfg = compose_config("stage=collect", f"paths.outputs={tmp_path}", override)
    with pytest.raises(WorldModelError, match=key.replace(".", r"\.")):
        run_stage(cfg)
    assert not (tmp_path / "mlflow.db").exists(), "validation must come before any work"


def test_help_lists_groups_and_a_clean_error_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "worldmodel", "--help"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=120,
    )
    assert out.returncode == 0
    for group in GROUPS:
        assert f"{group}:" in out.stdout
    assert "pseudo_random" in out.stdout and "z1024" in out.stdout

    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "worldmodel",
            "stage=collect",
            "collect.episodes=0",
            f"paths.outputs={tmp_path}",
            f"hydra.run.dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=120,
    )
    assert bad.returncode == 2
    text = bad.stdout + bad.stderr
    assert "collect.episodes" in text and "Traceback" not in text

    # A section the chosen stage does not read is validated too, when the command line sets it.
    typo = subprocess.run(
        [
            sys.executable,
            "-m",
            "worldmodel",
            "stage=collect",
            "evolve.mode=drem",
            f"paths.outputs={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=120,
    )
    assert typo.returncode == 2
    lines = [line for line in (typo.stdout + typo.stderr).splitlines() if "evolve.mode" in line]
    assert len(lines) == 1 and "one of ['real', 'dream'] (got 'drem')" in lines[0], typo.stderr[-1000:]
    assert not (tmp_path / "mlflow.db").exists(), "no collect ran"


@pytest.mark.parametrize(
    "override, message",
    [
        ("evolve.mode=drem", "config key 'evolve.mode' must be one of ['real', 'dream'] (got 'drem')"),
        ("train_vae.epochs=2.5", "config key 'train_vae.epochs' must be an integer (got 2.5)"),
        ("train_rnn.dropout=1", "config key 'train_rnn.dropout' must be a number in [0, 1) (got 1.0)"),
        ("evaluate.workers=0", "config key 'evaluate.workers' must be null or a positive integer (got 0)"),
        ("dream.fps=abc", "config key 'dream.fps' must be an integer (got 'abc')"),
        ("collect.reset_on_done=off", "config key 'collect.reset_on_done' must be true or false (got 'off')"),
        (
            "evolve.clip_actions=[2.5]",
            "config key 'evolve.clip_actions' must be a list of integers (got [2.5])",
        ),
    ],
)
def test_every_stage_section_given_is_validated_whichever_stage_runs(tmp_path, override, message):
    cfg = compose_config("stage=merge", f"paths.outputs={tmp_path}", override)
    with pytest.raises(WorldModelError) as err:
        run_stage(cfg, overrides=["stage=merge", override])
    assert str(err.value) == message
    assert not (tmp_path / "mlflow.db").exists(), "validation must come before any work"


def test_settings_are_typed_by_construction():
    from worldmodel.config import settings
    from worldmodel.config.sections import Evolve, Mode, TrainVAE

    cfg = compose_config("train_vae.lr=1", "evolve.mode=dream", "evolve.workers=null")
    vae, evolve = settings(cfg, TrainVAE), settings(cfg, Evolve)
    assert isinstance(vae.lr, float) and vae.lr == 1.0, "an int where a float is declared is a float"
    assert evolve.mode is Mode.dream and evolve.mode == "dream" and evolve.workers is None
    assert isinstance(evolve.clip_actions, list) and isinstance(evolve.popsize, int)


def test_a_runs_settings_come_from_its_logged_config_with_keys_it_predates(tmp_path):
    from omegaconf import OmegaConf

    from worldmodel.config.sections import Evolve, Mode

    cfg = compose_config(f"paths.outputs={tmp_path}", "evolve.popsize=12", "evolve.mode=dream")
    tracking.setup(cfg)
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["evolve"]["memory_sigma"], old["evolve"]["mirrored"]  # keys added after this run was made
    old["evolve"]["retired_key"] = 1  # a key since removed
    texts = {"now": OmegaConf.to_yaml(cfg), "old": OmegaConf.to_yaml(old), "bad": "{: [\x00"}
    ids = {}
    for name, text in texts.items():
        with mlflow.start_run() as run:
            mlflow.log_text(text, "config/config.yaml")
        ids[name] = run.info.run_id
    now = tracking.run_settings(mlflow.get_run(ids["now"]), Evolve)
    assert now.popsize == 12 and now.mode is Mode.dream and isinstance(now.sigma0, float)
    old = tracking.run_settings(mlflow.get_run(ids["old"]), Evolve)
    assert (old.memory_sigma, old.mirrored, old.popsize) == (1.0, False, 12), "what it did before the keys"
    with pytest.raises(WorldModelError, match=f"run {ids['bad']}: config/config.yaml holds no evolve"):
        tracking.run_settings(mlflow.get_run(ids["bad"]), Evolve)


def _collect_sweep(tmp_path, *launcher: str) -> None:
    """Two collect jobs (seed=1,2) as one Hydra multirun with `launcher`; both logged to one store."""
    out = subprocess.run(
        [sys.executable, "-m", "worldmodel", "-m", *launcher, "stage=collect", "experiment=smoke",
         "collect.episodes=1", "collect.workers=1", "seed=1,2", f"paths.outputs={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = sorted(p.name for p in (tmp_path / "multiruns").glob("*/*/*") if p.is_dir() and p.name[0] != ".")
    assert jobs == ["0_collect", "1_collect"]
    assert len(list((tmp_path / "multiruns").glob("*/*/*/collect.log"))) == 2
    tracking.setup(compose_config(f"paths.outputs={tmp_path}"))
    runs = mlflow.search_runs(filter_string="tags.stage = 'collect'", output_format="list")
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_multirun_with_the_joblib_launcher(tmp_path):
    _collect_sweep(tmp_path, "hydra/launcher=joblib")


@pytest.mark.slow
def test_multirun_with_the_submitit_local_launcher(tmp_path):
    """What a `hydra/launcher=submitit_slurm` sweep does on a cluster, with local processes instead."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    _collect_sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")


def test_backend_ray_without_ray_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    cfg = compose_config("stage=collect", f"paths.outputs={tmp_path}", "backend=ray")
    with pytest.raises(WorldModelError, match=r"backend=ray needs Ray: pip install -e '\.\[ray\]'"):
        run_stage(cfg)
    assert not (tmp_path / "mlflow.db").exists(), "validation must come before any work"
