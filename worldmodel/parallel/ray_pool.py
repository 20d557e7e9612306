"""`backend=ray`: the worker pool's interface on a Ray cluster, for collect episodes and real-env
rollouts (evolve, evaluate).

Each worker is an actor that runs `init(*init_args)` once and then `task(state, payload)` per call.
Ray's own fault tolerance does what `WorkerPool` does by hand on one machine: an actor whose process
dies is restarted (its `init` runs again) and the task it was running is retried, up to
`max_attempts` times in all. A task that runs past `timeout` seconds has its actor killed, which
Ray treats the same way. The init arguments go to the object store once and are shared by every
actor, so they must not name local files: a worker may be on another machine.

The cluster is the one `ray.init` finds: `backend.address`, else `RAY_ADDRESS`, else a new local
one. Every machine of the cluster needs this package installed (as for any Ray program).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from worldmodel.errors import WorldModelError, one_line
from worldmodel.parallel.pool import Pool

log = logging.getLogger(__name__)


def _ray():  # noqa: ANN202  (the module, imported only when asked for)
    try:
        import ray
    except ImportError as err:
        raise WorldModelError(
            "backend=ray needs Ray: pip install -e '.[ray]' (or use backend=local)"
        ) from err
    return ray


class _Worker:
    def __init__(self, init: Callable, init_args: tuple, task: Callable) -> None:
        self.state, self.task = init(*init_args), task

    def run(self, payload: Any) -> Any:
        return self.task(self.state, payload)


class RayPool(Pool):
    def __init__(
        self,
        workers: int | None,
        init: Callable,
        init_args: tuple,
        task: Callable,
        timeout: float,
        max_attempts: int = 3,
        most: int | None = None,
        address: str | None = None,
        num_cpus: float = 1,
    ) -> None:
        """`workers` actors of `num_cpus` each, None for as many as the cluster's CPUs allow, and never
        more than `most` (the tasks there are)."""
        ray = _ray()
        self.started = not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            # What ray.init raises for a cluster it cannot join (down, or refusing this driver's token).
            except (ConnectionError, RuntimeError) as err:
                where = address or os.environ.get("RAY_ADDRESS") or "this machine"
                raise WorldModelError(
                    f"backend=ray: cannot join the Ray cluster at {where} ({one_line(err, 160)}); "
                    "a cluster with token authentication needs RAY_AUTH_MODE=token and its token "
                    "(RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN) set before Python starts"
                ) from err
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus))
        workers = min(workers, most or workers)
        actor = ray.remote(_Worker).options(
            num_cpus=num_cpus, max_restarts=max_attempts - 1, max_task_retries=max_attempts - 1
        )
        self.shared = ray.put(init_args)  # held for the pool's life: a restarted actor reads it again
        self.actors = [actor.remote(init, self.shared, task) for _ in range(workers)]
        self.timeout, self.max_attempts = timeout, max_attempts
        self.replaced = 0  # actors killed for running past the timeout (Ray counts its own restarts)

    @staticmethod
    def check(address: str | None = None, **_: Any) -> None:
        """Before any work: is Ray installed, and does the cluster named by `address` (or RAY_ADDRESS)
        answer? Ray itself would retry an address that does not answer for minutes."""
        _ray()
        address = address or os.environ.get("RAY_ADDRESS")
        if not address or address in ("auto", "local") or "://" in address:
            return
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as err:
            raise WorldModelError(
                f"backend=ray: no Ray cluster answers at {address} ({err.__class__.__name__}); start one "
                "with `ray start --head`, or unset RAY_ADDRESS to start Ray on this machine"
            ) from err

    def imap_unordered(self, payloads: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """(index, result) pairs as tasks finish; one task at a time per actor, so that a slow worker
        holds back only its own task."""
        ray = _ray()
        pending = list(range(len(payloads)))[::-1]
        idle = list(self.actors)
        running: dict[Any, tuple[int, Any, float]] = {}  # ref → (task, actor, started at)

        def dispatch() -> None:
            while idle and pending:
                tid, actor = pending.pop(), idle.pop()
                running[actor.run.remote(payloads[tid])] = (tid, actor, time.monotonic())

        while pending or running:
            dispatch()
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                tid, actor, _ = running.pop(ref)
                idle.append(actor)
                dispatch()  # its next task first, then the caller handles this result (see WorkerPool)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayError as err:
                    raise WorldModelError(f"a Ray worker failed on task {tid}: {one_line(err)}") from err
                yield tid, value
            self._kill_hung(running)

    def _kill_hung(self, running: dict[Any, tuple[int, Any, float]]) -> None:
        # The clock of an actor's first task includes its init (seconds, against minutes of timeout);
        # it restarts when Ray retries the task on the restarted actor.
        ray, now = _ray(), time.monotonic()
        for ref, (tid, actor, started) in list(running.items()):
            if now - started > self.timeout:
                log.warning(
                    "Ray worker hung for more than %.0f s on task %d; restarting it", self.timeout, tid
                )
                ray.kill(actor, no_restart=False)
                running[ref] = (tid, actor, now)
                self.replaced += 1

    def close(self) -> None:
        ray = _ray()
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.shared = [], None
        if self.started:
            ray.shutdown()
