"""Atomic file writes shared by the runner and the rack side, and removal of the temporary
files a killed writer left behind.

A write goes to a temporary file beside its target, named ``.TARGET.tmp.PID.N`` after the
writing process, which holds an exclusive ``flock`` on it while writing; the file is flushed,
fsynced and renamed over the target, then the directory is fsynced so the rename itself is
durable. A reader sees the old file or the new one, never half of one.

A writer killed mid-write (SIGKILL, power loss) leaves its temporary file. Every write scans
its directory first and removes the temporary files whose writer is gone: the process named
in the file is not running here and nobody holds the file's lock. Either sign of life is
enough to leave a file alone, so a live writer's file is never removed; a writer whose
process id was reused keeps its leftover until that process ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from rackscope.errors import ResultError

log = logging.getLogger(__name__)

_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp\.(?P<pid>[0-9]{1,10})\.(?P<seq>[0-9]+)$")
# Long target names are cut in the temporary name so it stays within NAME_MAX (255 bytes).
_MAX_TARGET_CHARS = 200
_FILE_MODE = 0o666  # before the umask: a record is an ordinary readable file, not mkstemp's 0600
_sequence = itertools.count()
JSON_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS


def temp_path(target: Path, pid: int, seq: int) -> Path:
    """Where a write of ``target`` by process ``pid`` goes before it is renamed into place."""
    return target.with_name(f".{target.name[:_MAX_TARGET_CHARS]}.tmp.{pid}.{seq}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temporary files (of any writer)."""
    return _TEMP_NAME.match(name) is not None


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of ours may be writing
    if pid < 1:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return False
    return True


def _remove_if_unlocked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its writer still has it open (e.g. in another PID namespace)
        try:
            os.unlink(path)
        except OSError:
            return False
        return True
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove temporary files in ``directory`` whose writer is gone; return what was removed.

    Never raises: tidying up must not stop the write that asked for it."""
    removed: list[Path] = []
    try:
        with os.scandir(directory) as it:
            candidates = [
                (entry.path, int(m["pid"]))
                for entry in it
                if (m := _TEMP_NAME.match(entry.name)) is not None and entry.is_file(follow_symlinks=False)
            ]
    except OSError:
        return removed
    for name, pid in candidates:
        path = Path(name)
        if not _process_alive(pid) and _remove_if_unlocked(path):
            log.info("removed %s, left by process %d which is gone", path, pid)
            removed.append(path)
    return removed


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new, locked temporary file for ``target``: (descriptor, path)."""
    while True:
        tmp = temp_path(target, os.getpid(), next(_sequence))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        except FileExistsError:
            continue  # left by an earlier process that had our id, and not yet removed
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # A cleaner that saw our process as gone (another PID namespace) may have taken the
            # file between open and lock; then the name is no longer ours.
            if os.fstat(fd).st_ino == os.stat(tmp, follow_symlinks=False).st_ino:
                return fd, tmp
        except (BlockingIOError, FileNotFoundError):
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` only when the block finishes: written to a
    temporary file in the same directory, flushed, fsynced, renamed, and the directory
    fsynced. On any error the temporary file is removed and ``path`` is left as it was.
    Raises ``ResultError`` when the temporary file cannot be created; errors while writing
    (``OSError``) are the caller's to translate."""
    path = Path(path)
    directory = path.parent
    remove_stale_temps(directory)
    try:
        fd, tmp = _create_temp(path)
    except OSError as exc:
        raise ResultError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp, path)  # still locked: a cleaner never sees this file unowned
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; not every platform can open a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def dumps(obj: Any) -> bytes:
    """Indented JSON with a final newline, as every record is written."""
    try:
        return orjson.dumps(obj, option=JSON_OPTIONS) + b"\n"
    except TypeError as exc:
        raise ResultError(f"record is not serialisable: {exc}") from exc


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; ``ResultError`` when that fails."""
    try:
        with atomic_writer(path) as handle:
            handle.write(data)
    except OSError as exc:
        raise ResultError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_json(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as indented JSON, atomically."""
    write_bytes(path, dumps(obj))  # serialised first, so a bad record never touches the file


__all__ = [
    "JSON_OPTIONS",
    "atomic_writer",
    "dumps",
    "fsync_dir",
    "is_temp_name",
    "remove_stale_temps",
    "temp_path",
    "write_bytes",
    "write_json",
]
