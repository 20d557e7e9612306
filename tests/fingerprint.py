"""A fingerprint of everything a pipeline run computed: for each stage, its params, its metric
histories and the content of its artifacts, as SHA-256 digests. What varies from one run of the same
config to the next (run ids, times, paths, speeds, the host) is left out, and files are read for their
content, not their bytes: HDF5 datasets and attributes, checkpoint tensors, decoded image pixels. Two
runs of the same seeds on the same platform give the same fingerprint, whatever the code's layout.

It depends on MLflow, h5py, torch and Pillow only, so the code before a refactor can be fingerprinted
with the same script:  python tests/fingerprint.py <outputs dir> [<pipeline run id>] > golden.json

The checks: CarRacing's smoke pipeline, run as a user types it, in tests/test_command.py; CartPole's and
Doom's in their smoke pipeline tests (in-process, under `fresh_torch`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from PIL import Image, ImageSequence

# Metrics that time the machine, and params and tags that name runs, paths or the host.
TIMED = re.compile(r"(^progress/|per_s|seconds|_s$|/s$|elapsed|wall|duration|^system/|fps|speed|ratio_to)")
VOLATILE_PARAM = re.compile(r"^(paths\.|mlflow\.|inputs\.|hydra)|_target_$")
# MLflow names each image of a series by its step, a timestamp and a uuid.
IMAGE_SERIES = re.compile(r"\+timestamp\+\d+\+[0-9a-f-]+")
RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")
SKIP_FILES = re.compile(
    r"(^|/)(\.hydra/|config/|config\.yaml$|MLmodel$|conda\.yaml$|python_env\.yaml$|requirements"
    r"\.txt$|registered_model_meta$|input_example|serving_input)"
)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _array(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return digest(f"{a.dtype}{a.shape}".encode() + a.tobytes())


def _h5(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = _array(obj[()])
            for key, value in obj.attrs.items():
                text = RUN_ID.sub("<run>", str(value))
                out[f"{name}@{key}"] = digest(text.encode())

        for key, value in f.attrs.items():
            out[f"@{key}"] = digest(RUN_ID.sub("<run>", str(value)).encode())
        f.visititems(visit)
    return out


def _tensors(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = _array(value.detach().cpu().numpy())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            _tensors(value[k], f"{prefix}.{k}", out)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _tensors(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = digest(repr(value).encode())


def _checkpoint(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    _tensors(torch.load(path, map_location="cpu", weights_only=True), "", out)
    return out


def _image(path: Path) -> str:
    with Image.open(path) as im:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    return _array(np.stack(frames))


def _pt2(path: Path) -> str:
    """A torch.export archive: its weights (the graph's text names tensors by id and changes with the
    code that built it)."""
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if "/data/" in n or n.endswith((".bin", "weights")))
        return digest(b"".join(digest(z.read(n)).encode() for n in names))


def file_print(path: Path) -> dict[str, str] | str:
    suffix = path.suffix
    if suffix == ".h5":
        return _h5(path)
    if suffix == ".pt":
        return _checkpoint(path)
    if suffix in (".png", ".gif"):
        return _image(path)
    if suffix == ".pt2":
        return _pt2(path)
    if suffix in (".csv", ".json", ".yaml", ".txt", ".npz"):
        data = path.read_bytes()
        if suffix == ".npz":
            with np.load(io.BytesIO(data)) as z:
                return {k: _array(z[k]) for k in sorted(z.files)}
        return digest(RUN_ID.sub("<run>", data.decode(errors="replace")).encode())
    return digest(path.read_bytes())


def run_print(client: MlflowClient, run_id: str) -> dict[str, Any]:
    run = client.get_run(run_id)
    params = {k: v for k, v in run.data.params.items() if not VOLATILE_PARAM.search(k)}
    metrics = {}
    for key in sorted(run.data.metrics):
        if TIMED.search(key):
            continue
        history = client.get_metric_history(run_id, key)
        metrics[key] = [(m.step, repr(m.value)) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]
    root = Path(mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=mlflow.get_tracking_uri()))
    artifacts = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = IMAGE_SERIES.sub("", path.relative_to(root).as_posix())
        if not SKIP_FILES.search(name) and ".partial" not in name:
            artifacts[name] = file_print(path)
    return {"params": params, "metrics": metrics, "artifacts": artifacts}


def platform_key() -> str:
    """What float results depend on: torch's build, the CPU's vector instructions and torch's threads.
    A CPU with AMX tiles (Sapphire Rapids and later) reports AVX512 like its predecessors, but oneDNN
    picks other kernels there: the VAE's first epoch already differs, from identical data."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    cpu = f"{torch.backends.cpu.get_cpu_capability()}{', AMX' if amx else ''}, {platform.machine()}"
    return f"torch {torch.__version__}, {cpu}, {fresh_threads()} threads"


@functools.cache
def fresh_threads() -> int:
    """The intra-op threads torch starts with in a new process (a test may have changed this one's)."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True
    )
    return int(out.stdout)


@contextlib.contextmanager
def fresh_torch() -> Iterator[None]:
    """Torch's settings as a new process has them, for a while: what a stage computes in floats depends
    on them (another test may have set one thread and no oneDNN, as a worker does)."""
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(fresh_threads())
    torch.backends.mkldnn.enabled = True
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn


def fingerprint(outputs: Path, pipeline_id: str | None = None) -> dict[str, Any]:
    """The fingerprint of a pipeline run's stages (the latest pipeline run when no id is given), by
    `<round>/<stage>` in the order they ran."""
    mlflow.set_tracking_uri(f"sqlite:///{outputs.resolve() / 'mlflow.db'}")
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if pipeline_id is None:
        pipelines = client.search_runs(experiments, "tags.stage = 'pipeline'", order_by=["start_time DESC"])
        pipeline_id = pipelines[0].info.run_id
    out: dict[str, Any] = {}
    stack = [(pipeline_id, "")]
    while stack:
        parent, prefix = stack.pop()
        children = client.search_runs(
            experiments, f"tags.mlflow.parentRunId = '{parent}'", order_by=["start_time ASC"]
        )
        for child in children:
            name = f"{prefix}{child.data.tags.get('stage', 'run')}"
            name = next(f"{name}#{i}" for i in range(len(out) + 1) if f"{name}#{i}" not in out)
            if child.data.tags.get("round") is not None or child.data.tags.get("stage") == "pipeline":
                stack.append((child.info.run_id, f"{name}/"))
            out[name] = run_print(client, child.info.run_id)
    return {"platform": platform_key(), "stages": out}


if __name__ == "__main__":
    result = fingerprint(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
    json.dump(result, sys.stdout, indent=1, sort_keys=True)


GOLDEN = Path(__file__).parent / "golden"
# What a different platform can still compare: these stages compute without torch.
TORCH_FREE = ("collect", "merge")


def differences(expected: dict[str, Any], found: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys whose values differ, as paths (`train_vae#0/metrics/val/loss`)."""
    if not isinstance(expected, dict) or not isinstance(found, dict):
        return [] if expected == found else [prefix.rstrip("/")]
    out = []
    for key in sorted(set(expected) | set(found)):
        if key not in found or key not in expected:
            out.append(f"{prefix}{key} ({'missing' if key not in found else 'new'})")
        else:
            out += differences(expected[key], found[key], f"{prefix}{key}/")
    return out


def check_golden(name: str, outputs: Path, pipeline_id: str | None = None) -> None:
    """The pipeline run computed what the golden fingerprint `tests/golden/<name>.json` holds. On another
    platform (torch build, CPU vector instructions) only the torch-free stages compare. With
    $WM_GOLDEN_UPDATE=1 the golden is rewritten instead: for a change that means to change results."""
    found = json.loads(json.dumps(fingerprint(outputs, pipeline_id)))  # tuples as JSON lists
    path = GOLDEN / f"{name}.json"
    if os.environ.get("WM_GOLDEN_UPDATE") == "1":
        path.write_text(json.dumps(found, indent=1, sort_keys=True))
        return
    expected = json.loads(path.read_text())
    stages = expected["stages"]
    if expected["platform"] != found["platform"]:
        stages = {k: v for k, v in stages.items() if k.split("#")[0] in TORCH_FREE}
        found["stages"] = {k: v for k, v in found["stages"].items() if k in stages}
    diff = differences(stages, found["stages"])
    assert not diff, f"{name}: {len(diff)} differences from {path}: {diff[:20]}"
