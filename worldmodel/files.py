"""Files written whole or not at all: one name for a file being written, and the one clean-up of it.

A file is written as `<stem>.partial<suffix>` (the extension kept, for writers that go by it) and
renamed to its final name once complete, so a reader never sees half a file. Clean-up removes only
partial files of the exact names a stage writes, and never follows a symlink out of the directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
from collections.abc import Iterable, Iterator
from pathlib import Path

from worldmodel.errors import WorldModelError

PARTIAL = ".partial"


def partial_of(final: Path | str) -> Path:
    """The name `final` is written under until complete (a glob pattern maps to a pattern)."""
    final = Path(final)
    return final.with_name(f"{final.stem}{PARTIAL}{final.suffix}")


@contextlib.contextmanager
def atomic(final: Path) -> Iterator[Path]:
    """A path to write `final` to: it appears under its final name only when the block completes, and
    on an error (or Ctrl-C) nothing is left under either name."""
    partial = partial_of(final)
    try:
        yield partial
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)


def _inside(path: Path, root: Path) -> bool:
    """`path` lies under `root` with no symlink on the way (a link could lead anywhere)."""
    return not path.is_symlink() and path.resolve() == root.resolve() / path.relative_to(root)


def remove_partials(root: Path, finals: Iterable[str]) -> list[Path]:
    """Remove the partial files of `finals` (final names or globs of them, relative to `root`) found
    under `root`; nothing else is touched, and nothing reached through a symlink. Returns what went."""
    if root.is_symlink() or not root.is_dir():
        return []
    removed = []
    for pattern in finals:
        for path in root.glob(str(partial_of(pattern))):
            if path.is_file() and _inside(path, root):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# Errors of the machine rather than of the code: a full disk, a file-size limit, no permission.
SPACE, RIGHTS = "free space on the disk of paths.outputs (or point it at another)", "fix the permissions"
DISK_ERRORS = {
    errno.ENOSPC: ("the disk is full", SPACE),
    errno.EDQUOT: ("the disk quota is used up", SPACE),
    errno.EFBIG: ("a file grew past the file-size limit", "raise the limit (ulimit -f)"),
    errno.EACCES: ("permission denied", RIGHTS + " of paths.outputs (or point it elsewhere)"),
    errno.EPERM: ("operation not permitted", RIGHTS + " of paths.outputs (or point it elsewhere)"),
    errno.EROFS: ("the file system is read-only", "point paths.outputs at a writable one"),
}


def disk_error(err: BaseException) -> WorldModelError | None:
    """A one-line error for a full disk or a refused write anywhere in the chain of `err` (HDF5 and
    SQLite wrap the OSError in their own), or None when it is something else."""
    seen = err
    while seen is not None:
        code = getattr(seen, "errno", None)
        text = str(seen).replace("database or disk is full", os.strerror(errno.ENOSPC))  # SQLite's words
        for number, (what, todo) in DISK_ERRORS.items():
            if code == number or os.strerror(number) in text:
                where = getattr(seen, "filename", None)
                place = f" writing {where}" if where else ""
                return WorldModelError(f"{what}{place}: {todo}, then run the stage again")
        seen = seen.__cause__ or seen.__context__
    return None


def check_room(directory: Path, needed: int, what: str) -> None:
    """Fail before any work when `directory` cannot be written or lacks room for about `needed` bytes."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WorldModelError(f"cannot create {directory} ({err.strerror}); set paths.outputs") from err
    if not os.access(directory, os.W_OK | os.X_OK):
        raise WorldModelError(f"{directory} is not writable; {what} needs to write there (set paths.outputs)")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < needed:
        raise WorldModelError(
            f"the file-size limit (ulimit -f) is {limit / 2**20:.1f} MB, {what} writes about "
            f"{needed / 2**20:.1f} MB to {directory}; raise the limit"
        )
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if free < needed:
        raise WorldModelError(
            f"{directory} has {free / 2**20:.0f} MB free, {what} needs about {needed / 2**20:.0f} MB; "
            "free space or set paths.outputs to a larger disk"
        )


class Reserve:
    """A few MB held on the store's disk while a stage runs, given back when the stage fails: on a full
    disk, the store can still record that the run FAILED (SQLite needs room to write even that)."""

    SIZE = 4 * 2**20

    def __init__(self, directory: Path) -> None:
        self.path = directory / f".reserve-{os.getpid()}"
        for stale in directory.glob(".reserve-*"):  # of processes killed with -9
            pid = stale.name.removeprefix(".reserve-")
            if pid.isdigit() and not process_exists(int(pid)):
                stale.unlink(missing_ok=True)
        try:
            with open(self.path, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, self.SIZE)
        except OSError:  # no room to hold back: nothing to give back either
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    """Whether `pid` is alive. A reused pid reads as alive too: that errs on the safe side (a run is
    refused or left alone, never cleaned up under a live process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
