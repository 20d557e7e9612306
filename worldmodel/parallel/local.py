"""`backend=local`: a process pool that survives its workers. A worker that dies or hangs past
`timeout` seconds is replaced and its task re-run on another, so a stage never hangs on one bad process.
Task timeouts count from the moment a worker has finished `init` (loading models can take a while) and
reported ready; a worker that is not ready after `start_timeout` seconds (default: the task timeout, at
least 60 s, since a spawned process importing torch on a busy machine can take many seconds) is
replaced.

Workers end with their parent: each watches the parent's sentinel and exits as soon as the parent is
gone, however it died (kill -9 included), so no orphan is left waiting on its task queue. They ignore
Ctrl-C, which the parent handles for them. Each worker leads its own process group, and goes with that
group: a process it started (VizDoom's engine runs as one) is killed with it, and never outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.reduction import ForkingPickler
from typing import Any

from worldmodel.errors import WorldModelError
from worldmodel.parallel.pool import Pool

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while a worker starts: cut short, its start-up data would leave it dying
    with a traceback of its own. The signal is delivered as soon as the worker is started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in caught:
            os.kill(os.getpid(), s)


def _exit_with_parent() -> None:
    parent = mp.parent_process()

    def watch() -> None:
        parent.join()  # returns when the parent's sentinel closes: the parent is gone
        _kill_group(os.getpid())  # this worker and whatever it started
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _kill_group(pid: int) -> None:
    """SIGKILL the process group that worker `pid` leads (nothing if it is gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _worker_main(init: Callable, task: Callable, tasks: mp.Queue, results: mp.Queue, wid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.setpgid(0, 0)  # its own group: see _kill_group
    _exit_with_parent()
    state = init(*ForkingPickler.loads(tasks.get()))  # init's arguments: see WorkerPool._spawn
    results.put((wid, None, True, "ready"))  # timeouts count from here, not from process start
    while (item := tasks.get()) is not None:
        tid, payload = item
        try:
            results.put((wid, tid, True, task(state, payload)))
        except Exception as err:  # reported to the parent, which decides
            results.put((wid, tid, False, f"{err.__class__.__name__}: {err}"))


class WorkerPool(Pool):
    def __init__(
        self,
        workers: int | None,
        init: Callable,
        init_args: tuple,
        task: Callable,
        timeout: float,
        max_attempts: int = 3,
        start_timeout: float | None = None,
        most: int | None = None,
    ) -> None:
        """`workers` processes, None for one per core, and never more than `most` (the tasks there are)."""
        workers = min(workers or os.cpu_count() or 1, most or 1 << 30)
        self.ctx = mp.get_context("spawn")
        self.init, self.task = init, task
        self.init_args = bytes(ForkingPickler.dumps(init_args))  # once; what cannot be pickled fails here
        self.timeout, self.max_attempts = timeout, max_attempts
        self.start_timeout = start_timeout if start_timeout is not None else max(timeout, 60.0)
        self.results: mp.Queue = self.ctx.Queue()
        self.procs: dict[int, tuple[mp.Process, mp.Queue]] = {}
        self.ready: set[int] = set()
        self.spawned: dict[int, float] = {}
        self._next_wid = 0
        self.replaced = 0
        self.start_failures = 0
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        wid, self._next_wid = self._next_wid, self._next_wid + 1
        # init's arguments (model weights: megabytes) go by the task queue, not with the process: start()
        # writes the process into a pipe, and past the pipe's 64 KiB it blocks until the new process has
        # imported torch and read it, so the workers would start one after the other.
        tasks = self.ctx.Queue()
        tasks.cancel_join_thread()  # a worker that dies unread must not keep this process from exiting
        tasks.put(self.init_args)
        proc = self.ctx.Process(
            target=_worker_main,
            daemon=True,
            args=(self.init, self.task, tasks, self.results, wid),
        )
        with _signals_held():
            proc.start()
        self.procs[wid] = (proc, tasks)
        self.spawned[wid] = time.monotonic()

    def _replace(self, wid: int) -> None:
        proc, _ = self.procs.pop(wid)
        self.ready.discard(wid)
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        _kill_group(proc.pid)
        self.replaced += 1
        self._spawn()

    def imap_unordered(self, payloads: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """(index, result) pairs as tasks finish; each task's result is yielded exactly once."""
        pending = deque(range(len(payloads)))
        busy: dict[int, tuple[int, float]] = {}  # worker → (task, started at)
        attempts = [0] * len(payloads)
        finished = 0

        def dispatch() -> None:
            for wid, (_, tasks) in list(self.procs.items()):
                if wid in self.ready and wid not in busy and pending:
                    tid = pending.popleft()
                    attempts[tid] += 1
                    busy[wid] = (tid, time.monotonic())
                    tasks.put((tid, payloads[tid]))

        while finished < len(payloads):
            dispatch()
            try:
                wid, tid, ok, value = self.results.get(timeout=0.2)
                if tid is None:
                    self.ready.add(wid)
                elif busy.get(wid, (None,))[0] == tid:  # else: from a worker already given up on
                    del busy[wid]
                    if not ok:
                        raise WorldModelError(f"a worker failed on task {tid}: {value}")
                    finished += 1
                    # The worker gets its next task before the caller handles this result (e.g. writes
                    # a shard): otherwise every worker idles for as long as the caller takes, and at
                    # 16 workers the results queue up behind one another.
                    dispatch()
                    yield tid, value
            except queue.Empty:
                pass
            self._restart_failed_starts()
            now = time.monotonic()
            for wid, (tid, started) in list(busy.items()):
                proc, _ = self.procs[wid]
                hung = now - started > self.timeout
                if proc.is_alive() and not hung:
                    continue
                why = (
                    f"hung for more than {self.timeout:.0f} s"
                    if proc.is_alive()
                    else f"died ({proc.exitcode})"
                )
                log.warning("worker %d %s on task %d; re-running it on another worker", wid, why, tid)
                del busy[wid]
                self._replace(wid)
                if attempts[tid] >= self.max_attempts:
                    raise WorldModelError(
                        f"task {tid} failed {attempts[tid]} times (last: worker {why}); see the log"
                    )
                pending.appendleft(tid)

    def _restart_failed_starts(self) -> None:
        now = time.monotonic()
        for wid, (proc, _) in list(self.procs.items()):
            if wid not in self.ready and (
                not proc.is_alive() or now - self.spawned[wid] > self.start_timeout
            ):
                self.start_failures += 1
                if self.start_failures > 2 * len(self.procs) + 2:
                    raise WorldModelError(
                        f"worker processes keep dying while starting (exit code {proc.exitcode}); "
                        "see the log above"
                    )
                log.warning("worker %d failed to start (exit code %s); starting another", wid, proc.exitcode)
                self._replace(wid)

    def close(self) -> None:
        for proc, tasks in self.procs.values():
            if proc.is_alive():
                tasks.put(None)
        for proc, _ in self.procs.values():
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
            _kill_group(proc.pid)  # what it started and left running
        self.procs.clear()
