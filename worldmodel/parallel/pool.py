"""The worker pool's interface, shared by both backends, and `make_pool`, which builds the one the
config names: `backend=local` (`local.WorkerPool`, processes on this machine) or `backend=ray`
(`ray_pool.RayPool`, a Ray cluster).

Each worker runs `init(*init_args)` once (e.g. build an env and load models) and then
`task(state, payload)` for every payload it is given. Functions must be importable (spawn).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from worldmodel.errors import WorldModelError


class Pool:
    """What both backends' pools share: `imap_unordered` and `close` are theirs, the rest is here."""

    def imap_unordered(self, payloads: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backend_settings(backend: DictConfig) -> DictConfig:
    """A backend config (conf/backend) without `name`, which only tags the runs: `_target_` and the
    keyword arguments of its pool class."""
    return OmegaConf.masked_copy(backend, [k for k in backend if k != "name"])


def make_pool(
    backend: DictConfig,
    workers: int | None,
    init: Callable,
    init_args: tuple,
    task: Callable,
    timeout: float,
    most: int | None = None,
) -> Pool:
    """The worker pool that `backend` names, with its own settings: `WorkerPool` here, or `RayPool`
    with the same interface."""
    cls = instantiate(backend_settings(backend), _partial_=True)  # settings bound, nothing built yet
    return cls(workers, init, init_args, task, timeout=timeout, most=most)


def check_backend(backend: DictConfig) -> None:
    """The backend's pool class imports, and says whether what it needs is there (its `check`)."""
    module, _, name = str(backend._target_).rpartition(".")
    try:  # not hydra's get_class, which logs a traceback of its own
        pool = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise WorldModelError(
            f"config key 'backend._target_' must name a worker pool class (got {backend._target_!r})"
        ) from err
    settings = OmegaConf.to_container(backend_settings(backend))
    settings.pop("_target_")
    getattr(pool, "check", lambda **_: None)(**settings)
