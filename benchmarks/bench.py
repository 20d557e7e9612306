"""`make bench`: each performance figure as a ratio against a baseline measured in the same run.

The machines are shared and noisy, so no figure is an absolute time: each is compared with a baseline
timed minutes (or seconds) apart on the same machine, best of a few repeats. Prints a table and writes
outputs/bench/latest.json: [{figure, value, baseline, ratio, target}, ...].
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import mlflow
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

import worldmodel  # noqa: E402,F401
from worldmodel import tracking  # noqa: E402
from worldmodel.config import CONFIG_DIR  # noqa: E402
from worldmodel.control.agent import Agent, play, worker_inference  # noqa: E402
from worldmodel.control.dream import dream_rollouts, initial_latents  # noqa: E402
from worldmodel.control.scorer import RealScorer  # noqa: E402
from worldmodel.data import rollouts  # noqa: E402
from worldmodel.data.datasets import ShuffledFrameBatches  # noqa: E402
from worldmodel.data.merge import merge_files  # noqa: E402
from worldmodel.envs.pixels import make_env  # noqa: E402
from worldmodel.models.controller import Controller  # noqa: E402
from worldmodel.models.mdnrnn import MDNRNN  # noqa: E402
from worldmodel.models.vae import VAE, to_input, vae_loss  # noqa: E402
from worldmodel.stages import run_stage  # noqa: E402

WORKERS = int(os.environ.get("BENCH_WORKERS", os.cpu_count() or 1))  # --workers N overrides
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # --device overrides
RESULTS: list[dict] = []


def best_of(fn: Callable[[], float], repeats: int = 3) -> float:
    """The best rate (per second) of `repeats` runs: the least disturbed by other load."""
    return max(fn() for _ in range(repeats))


def lockstep_rate(
    envs: list, vae: VAE, rnn: MDNRNN, controller: Controller, params: np.ndarray, slots: int
) -> float:
    """Env steps/s of one real-mode agent (V + M + C) driving `slots` envs in lockstep for 300 steps,
    row i with params[i]: one batched forward per step, as an evolve worker."""
    agent = Agent(vae, rnn, controller, slots)
    agent.set_params(params[:slots])
    t = time.perf_counter()
    done = play(envs[:slots], agent, list(range(slots)), 300)
    return sum(r.steps for r in done) / (time.perf_counter() - t)


def record(figure: str, value: float, baseline: float, target: str, ratio: float | None = None) -> None:
    ratio = value / baseline if ratio is None else ratio
    RESULTS.append(
        {
            "figure": figure,
            "value": round(value, 3),
            "baseline": round(baseline, 3),
            "ratio": round(ratio, 3),
            "target": target,
        }
    )
    print(f"  {figure:<48} {value:>12.1f} {baseline:>12.1f} {ratio:>8.2f}  {target}", flush=True)


def steps_per_s(env: gym.Env, steps: int, seed: int = 0, action: object = None) -> float:
    """Steps/s after the first 50 (CarRacing's camera zoom-in shows the whole track and is slower), of
    one held action (default: CarRacing's gentle left and half gas)."""
    env.reset(seed=seed)
    action = np.array([0.05, 0.5, 0.0], np.float32) if action is None else action
    for _ in range(50):
        env.step(action)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(action)
        if term or trunc:
            env.reset()
    return steps / (time.perf_counter() - t0)


def cfg_for(store: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(
            config_name="config", overrides=["experiment=smoke", f"paths.outputs={store}", *overrides]
        )


def collect_run(store: Path, episodes: int, workers: int, *overrides: str) -> tuple[str, float]:
    """A smoke collect of `episodes` × 1000 steps (or what `overrides` set) and its frames/s. Through the
    CLI, as a user runs it (spawned workers then import only what `python -m worldmodel` does); the
    stage's own frames/s: worker start-up included, MLflow set-up not."""
    cli = [
        sys.executable, "-m", "worldmodel", "stage=collect", "experiment=smoke",
        f"paths.outputs={store}", f"hydra.run.dir={store}/run", f"collect.episodes={episodes}",
        "collect.max_steps=1000", f"collect.workers={workers}", "collect.episodes_per_shard=2", *overrides,
    ]  # fmt: skip
    subprocess.run(cli, check=True, cwd=ROOT, capture_output=True)
    cfg = cfg_for(store, *overrides)
    tracking.setup(cfg)
    run = tracking.resolve_run(cfg, "collect", None, {"image_size": "64"})
    return run.info.run_id, run.data.metrics["frames_per_s"]


def main() -> None:
    global WORKERS, DEVICE
    parser = argparse.ArgumentParser(description="worldmodel benchmarks, as ratios to same-run baselines")
    parser.add_argument(
        "--workers", type=int, default=WORKERS, help="collect and evolve workers (BENCH_WORKERS)"
    )
    parser.add_argument("--device", default=str(DEVICE), help="where the VAE trains (default: cuda if any)")
    args = parser.parse_args()
    WORKERS, DEVICE = args.workers, torch.device(args.device)
    torch.set_num_threads(1)
    store = Path(tempfile.mkdtemp(prefix="wm-bench-"))
    print(
        f"worldmodel benchmarks on {os.cpu_count()} cores, {WORKERS} workers, VAE on {DEVICE}; store {store}"
    )
    print(f"  {'figure':<48} {'value':>12} {'baseline':>12} {'ratio':>8}  target")
    try:
        run_all(store)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    out = ROOT / "outputs" / "bench" / "latest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2))
    print(f"written {out}")


def run_all(store: Path) -> None:
    base = cfg_for(store)
    stock_env = make_env(cfg_for(store, "env.fast_render=false").env)
    fast_env = make_env(base.env)

    # 1. The renderer: steps/s of the fast env against the stock env, same core, alternating.
    stock = best_of(lambda: steps_per_s(stock_env.env, 300))
    fast = best_of(lambda: steps_per_s(fast_env.env, 300))
    record("env steps/s, fast renderer (vs stock)", fast, stock, ">=2.5")

    # 2. collect with N workers against N × one process stepping the raw (fast) env, and against N ×
    #    collect itself with one worker (in-process: the same per-frame work, no pool).
    _, one_worker = collect_run(store, 2, 1)
    collect_id, collect_fps = collect_run(store, 4 * WORKERS, WORKERS)  # its shards feed merge below
    record(f"collect frames/s, {WORKERS} workers (vs N x raw env)", collect_fps, WORKERS * fast, ">=0.9")
    record(
        f"collect frames/s, {WORKERS} workers (vs N x collect, 1 worker)",
        collect_fps,
        WORKERS * one_worker,
        ">=0.9",
    )

    # 3. merge (verified shards → one file) against copying the shard files.
    shards = [tracking.artifact_path(collect_id, p) for p in tracking.list_artifacts(collect_id, "shards")]
    size = sum(p.stat().st_size for p in shards)

    def copy_rate() -> float:
        target = store / "copy"
        target.mkdir(exist_ok=True)
        t = time.perf_counter()
        for p in shards:
            shutil.copyfile(p, target / p.name)
        return size / (time.perf_counter() - t)

    infos = [rollouts.inspect(p) for p in shards]

    def merge_rate() -> float:
        out = store / "merged.h5"
        out.unlink(missing_ok=True)
        t = time.perf_counter()
        merge_files(infos, [collect_id] * len(infos), out, 0.1, 0, 25, 1)
        return size / (time.perf_counter() - t)

    copy = best_of(copy_rate)
    record("merge MB/s (vs shutil.copyfile of shards)", best_of(merge_rate) / 2**20, copy / 2**20, ">=0.5")
    merge_id = run_stage(cfg_for(store, "stage=merge", f"inputs.collect={collect_id}"))

    # 4-5. VAE data loading and an epoch read from HDF5 against tensors already in memory.
    dataset = tracking.artifact_path(merge_id, "dataset.h5")
    batch = 100
    loader = ShuffledFrameBatches(dataset, batch, "train", buffer_frames=1024, seed=0)

    def loader_rate() -> float:
        t, n = time.perf_counter(), 0
        for b in loader:
            n += len(to_input(b))
        return n / (time.perf_counter() - t)

    torch.set_num_threads(os.cpu_count() or 1)  # training uses every core, as the stage does
    model = VAE(32, 64).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    memory = [b.to(DEVICE) for b in loader]  # uint8 on the device, converted there as the stage does

    def train_steps(batches) -> float:
        t, n = time.perf_counter(), 0
        for b in batches:
            x = to_input(b.to(DEVICE, non_blocking=True))
            loss = vae_loss(x, *model(x), 0.5).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(x)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    train_fps = best_of(lambda: train_steps(memory[:8]), 2)
    loader_fps = best_of(loader_rate)
    record(f"VAE loader frames/s (vs VAE training frames/s, {DEVICE.type})", loader_fps, train_fps, ">=5")
    from_memory = best_of(lambda: train_steps(memory), 2)
    from_hdf5 = best_of(lambda: train_steps(loader), 2)
    record(
        f"VAE epoch time, HDF5 (vs in-memory tensors, {DEVICE.type})",
        len(memory) * batch / from_hdf5,
        len(memory) * batch / from_memory,
        "<=1.1",
        ratio=from_memory / from_hdf5,
    )
    record(
        f"train_vae frames/s from HDF5 on {DEVICE.type} (vs loader alone)", from_hdf5, loader_fps, "report"
    )
    # train_vae.precision=bf16 train_vae.channels_last=true against fp32, same batches (for GPUs).
    model = model.to(memory_format=torch.channels_last)
    with torch.autocast(DEVICE.type, torch.bfloat16):
        fast = best_of(lambda: train_steps(memory), 2)
    record(
        f"VAE training frames/s, bf16 + channels_last (vs fp32, {DEVICE.type})", fast, from_memory, "report"
    )
    model.cpu()

    # 6. encode (the stage, through HDF5) against the encoder on an in-memory batch.
    vae_id = run_stage(cfg_for(store, "stage=train_vae", f"inputs.merge={merge_id}", "train_vae.epochs=1"))
    x = to_input(memory[0].cpu()).repeat(10, 1, 1, 1)[:1000]
    enc_model = VAE(32, 64).eval()

    def encoder_rate() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            enc_model.encode(x)
            return len(x) / (time.perf_counter() - t)

    encoder = best_of(encoder_rate)
    enc = []
    for _ in range(2):  # the stage's own frames/s: reading, encoding and writing every frame
        encode_id = run_stage(
            cfg_for(store, "stage=encode", f"inputs.train_vae={vae_id}", "encode.batch_size=1000")
        )
        enc.append(mlflow.get_run(encode_id).data.metrics["frames_per_s"])
    record("encode frames/s (vs encoder on in-memory batch)", max(enc), encoder, ">=0.9")

    # 7. A real-mode evolve worker (env + VAE + MDN-RNN + controller, one thread) against the raw env:
    #    one env as before, and 4 envs in lockstep with one batched forward per step.
    worker_inference()  # as the evolve workers do
    rnn = MDNRNN(32, 3, 256, 5).eval()
    controller = Controller(32, 256)
    vae = VAE(32, 64).eval()
    params = np.random.default_rng(0).standard_normal((4, controller.n_params)).astype(np.float32) * 0.1
    envs = [fast_env] + [make_env(base.env) for _ in range(3)]

    def worker_rate(slots: int) -> float:
        return lockstep_rate(envs, vae, rnn, controller, params, slots)

    raw = best_of(lambda: steps_per_s(fast_env.env, 300))
    record(
        "evolve real-mode steps/s per worker, 1 env (vs raw env)",
        best_of(lambda: worker_rate(1)),
        raw,
        ">=0.8",
    )
    record(
        "real-mode env steps per core-second, 4 envs in lockstep (vs raw env)",
        best_of(lambda: worker_rate(4)),
        raw,
        ">=0.8",
    )

    # 8. Dream-mode against real-mode rollouts/s on the same cores (popsize 16 × 4 rollouts, 200 steps).
    torch.set_num_threads(os.cpu_count() or 1)
    torch.backends.mkldnn.enabled = True
    pop, per_candidate, horizon = 16, 4, 200
    population = torch.randn(pop * per_candidate, controller.n_params) * 0.1
    seeds = list(range(pop * per_candidate))
    z0 = initial_latents(np.zeros((4, 32), np.float32), np.zeros((4, 32), np.float32), seeds)
    with torch.no_grad():
        rnn.head.bias[-1] = -10.0  # never "done", so every dream runs the full horizon

    def dream_rate() -> float:
        t = time.perf_counter()
        dream_rollouts(rnn, controller, population, z0, seeds, horizon, 1.0)
        return len(seeds) / (time.perf_counter() - t)

    dream = best_of(dream_rate, 2)
    checkpoints = {"vae": store / "vae.pt", "rnn": store / "rnn.pt"}
    torch.save({"state_dict": vae.state_dict(), "hparams": vae.hparams}, checkpoints["vae"])
    torch.save({"state_dict": rnn.state_dict(), "hparams": rnn.hparams}, checkpoints["rnn"])
    files = {k: str(v) for k, v in checkpoints.items()}
    scorer = RealScorer(base.backend, WORKERS, 4, files, base.env, controller.hparams, timeout=600)
    try:
        scorer.run(population[:WORKERS].numpy(), list(range(WORKERS)), 5)  # workers started and warm
        n_real = 8 * WORKERS
        t = time.perf_counter()
        scorer.run(population[:n_real].numpy(), list(range(n_real)), horizon)
        real = n_real / (time.perf_counter() - t)
    finally:
        scorer.close()
    record(f"evolve dream rollouts/s (vs real, {WORKERS} cores)", dream, real, ">=100")
    doom_rows(store)


def doom_rows(store: Path) -> None:
    """9. env=doom (the doom extra): VizDoom's steps/s through worldmodel's env against the raw env, and
    collect's frames/s with N workers against N × the raw env."""
    try:
        import vizdoom.gymnasium_wrapper  # noqa: F401
    except ImportError:
        print("  (env=doom rows skipped: make setup-doom)")
        return
    torch.set_num_threads(1)
    doom = cfg_for(store, "env=doom")
    env = make_env(doom.env)
    try:
        raw = best_of(lambda: steps_per_s(env.env, 1000, action=1))

        def pixel_rate() -> float:
            actions, t = np.eye(3, dtype=np.float32), time.perf_counter()
            env.reset(seed=0)
            for i in range(1000):
                if any(env.step(actions[i % 3])[2:]):
                    env.reset()
            return 1000 / (time.perf_counter() - t)

        record("Doom env steps/s, 64x64 frames (vs raw VizDoom)", best_of(pixel_rate), raw, "report")
    finally:
        env.close()
    _, fps = collect_run(store, 2 * WORKERS, WORKERS, "env=doom", "collect.max_steps=2100")
    record(f"Doom collect frames/s, {WORKERS} workers (vs N x raw VizDoom)", fps, WORKERS * raw, "report")


if __name__ == "__main__":
    main()
