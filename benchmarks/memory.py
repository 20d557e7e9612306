"""Peak memory of train_rnn, evolve (dream mode) and dream against the number of episodes.

Writes a synthetic latents file of N episodes (random latents, real layout) into a throwaway MLflow
store, registers it as an encode run (with a randomly initialised VAE as its train_vae run), and runs
each stage on it in its own process under `/usr/bin/time`, which reports the peak resident set size.

    python benchmarks/memory.py --episodes 1000 10000 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from worldmodel.data import latents
from worldmodel.data.merge import make_split
from worldmodel.models.checkpoints import save_checkpoint
from worldmodel.models.vae import VAE

ROOT = Path(__file__).resolve().parents[1]
LATENT, ACTIONS = 32, 3


def synthetic_latents(path: Path, episodes: int, steps: int) -> None:
    attrs = {"latent_size": LATENT, "image_size": 64, "env_id": "CarRacing-v3"}
    f = latents.create(path, episodes, steps, LATENT, ACTIONS, attrs)
    rng = np.random.default_rng(0)
    for e in range(episodes):
        f["mu"][e] = rng.standard_normal((steps, LATENT), dtype=np.float32)
        f["logvar"][e] = np.full((steps, LATENT), -3, np.float32)
        f["actions"][e] = rng.uniform(-1, 1, (steps, ACTIONS)).astype(np.float32)
        f["rewards"][e] = rng.standard_normal(steps, dtype=np.float32)
        f["dones"][e, -1] = True
    f["lengths"] = np.full(episodes, steps, np.int32)
    train, val = make_split(episodes, 0.1, 0)
    f.create_dataset("split/train", data=train.astype(np.int64))
    f.create_dataset("split/val", data=val.astype(np.int64))
    f.close()


def register(store: Path, lat_path: Path) -> str:
    """A FINISHED train_vae run (random VAE) and a FINISHED encode run holding `lat_path`."""
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    experiment = mlflow.create_experiment("CarRacing-v3", artifact_location=(store / "artifacts").as_uri())
    client = MlflowClient()
    vae = client.create_run(
        experiment, tags={"stage": "train_vae", "latent_size": str(LATENT), "image_size": "64"}
    )
    ckpt = store / "best.pt"
    save_checkpoint(ckpt, VAE(LATENT, 64), epoch=0, best_val=0.0)
    client.log_artifact(vae.info.run_id, str(ckpt), "checkpoints")
    client.set_terminated(vae.info.run_id, "FINISHED")
    tags = {"stage": "encode", "latent_size": str(LATENT), "upstream.train_vae": vae.info.run_id}
    encode = client.create_run(experiment, tags=tags)
    client.log_artifact(encode.info.run_id, str(lat_path))
    client.set_terminated(encode.info.run_id, "FINISHED")
    return encode.info.run_id


def peak_mb(store: Path, *overrides: str) -> tuple[float, float, str]:
    """Run one stage; its peak RSS in MB, its wall time, and its log tail."""
    args = ["/usr/bin/time", "-f", "PEAK_KB=%M", sys.executable, "-m", "worldmodel", f"paths.outputs={store}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    t0 = time.perf_counter()
    out = subprocess.run([*args, *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"{overrides} failed:\n{log[-3000:]}")
    return int(re.findall(r"PEAK_KB=(\d+)", log)[-1]) / 1024, elapsed, log


def latest(store: Path, stage: str) -> str:
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=["CarRacing-v3"],
        filter_string=f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return runs[0].info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--stages", nargs="+", default=["train_rnn", "evolve", "dream"])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "memory.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in args.episodes:
        with tempfile.TemporaryDirectory(prefix="wm-memory-") as tmp:
            store = Path(tmp)
            t0 = time.perf_counter()
            lat = store / "latents.h5"
            synthetic_latents(lat, n, args.steps)
            size = lat.stat().st_size / 2**20
            encode = register(store, lat)
            lat.unlink()  # the store holds its own copy
            took = time.perf_counter() - t0
            print(f"{n} episodes × {args.steps} steps: latents.h5 {size:.0f} MB, written in {took:.0f} s")
            row = {"episodes": n, "steps": args.steps, "latents_mb": round(size)}
            common = ("experiment=smoke", "latent=z32", "device=cpu")
            row["train_rnn_mb"], row["train_rnn_s"], _ = peak_mb(  # every stage below needs its M
                store,
                *common,
                "stage=train_rnn",
                f"inputs.encode={encode}",
                "train_rnn.epochs=1",
                "train_rnn.seq_len=100",
                "train_rnn.batch_size=64",
                "train_rnn.hidden=256",
                "train_rnn.mixtures=5",
            )
            rnn = latest(store, "train_rnn")
            later = {
                "evolve": (
                    "evolve.mode=dream",
                    "evolve.generations=1",
                    "evolve.real_check_every=0",
                    "evolve.eval_episodes=0",
                ),
                "dream": ("dream.mode=free", "dream.use_controller=false"),
            }
            for stage in [s for s in later if s in args.stages]:
                overrides = (*common, f"stage={stage}", f"inputs.train_rnn={rnn}", *later[stage])
                row[f"{stage}_mb"], row[f"{stage}_s"], _ = peak_mb(store, *overrides)
            print(json.dumps(row))
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
