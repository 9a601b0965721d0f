"""Reading a rack run's shared results folder, where every file is untrusted input.

Rack tasks on many nodes write into one shared folder, and ``rackscope rack collect`` (and
every task, at the start barrier) reads what the others wrote. Any of them may be broken or
hostile, so a file is read only if it is a regular file inside the folder, reached without
following a symbolic link at any step (a link to ``/etc/shadow`` or out of the folder is
refused, not read), within a size cap checked on the opened descriptor, and parsed as the JSON
object its model says. Errors are ``FolderError`` naming the file by its place in the folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from rackscope.errors import ResultError
from rackscope.jsontypes import JsonDict
from rackscope.rack.answers import describe
from rackscope.rack.client import printable

M = TypeVar("M", bound=BaseModel)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO someone left in the folder must not hang the reader.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class FolderError(ResultError):
    """A file of the results folder is missing, not a plain file, too large or malformed."""


class MissingFile(FolderError):
    """The file is not there (yet)."""


def _show(parts: Sequence[str]) -> str:
    return printable("/".join(parts), 200)


@contextlib.contextmanager
def open_checked(root: Path, parts: Sequence[str], max_bytes: int) -> Iterator[IO[bytes]]:
    """The file ``root/parts...`` opened for reading: every folder on the way and the file
    itself opened without following links, the file a regular one of at most ``max_bytes``
    (checked on the open descriptor, so swapping the file afterwards changes nothing)."""
    shown = _show(parts)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the folder the operator named
    except OSError as exc:
        raise FolderError(f"cannot open {root}: {exc.strerror or exc}") from exc
    try:
        for part in parts[:-1]:
            inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
        file_fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(root, parts):
            raise FolderError(f"{shown}: a symbolic link is on the way; links are not followed") from exc
        if exc.errno == errno.ENOENT:
            raise MissingFile(f"{shown}: no such file") from exc
        raise FolderError(f"{shown}: cannot open: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        info = os.fstat(file_fd)
        if not stat.S_ISREG(info.st_mode):
            raise FolderError(f"{shown}: not a regular file")
        if info.st_size > max_bytes:
            raise FolderError(f"{shown}: {info.st_size:,} bytes, more than the {max_bytes:,} accepted")
        os.set_blocking(file_fd, True)
        handle = os.fdopen(file_fd, "rb")
    except BaseException:
        os.close(file_fd)
        raise
    with handle:
        yield handle


def _is_link(root: Path, parts: Sequence[str]) -> bool:
    """Whether a step of ``root/parts`` is a symbolic link (for the message only)."""
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            return True
    return False


def read_bytes(root: Path, parts: Sequence[str], max_bytes: int) -> bytes:
    """The whole file (see ``open_checked``); a file that grew past the cap while being read
    is refused too."""
    with open_checked(root, parts, max_bytes) as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FolderError(f"{_show(parts)}: grew past {max_bytes:,} bytes while being read")
    return data


def read_object(root: Path, parts: Sequence[str], max_bytes: int, model: type[BaseModel] | None = None) -> JsonDict:
    """A JSON object file, checked against ``model`` (strict pydantic) when given."""
    data = read_bytes(root, parts, max_bytes)
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise FolderError(f"{_show(parts)}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise FolderError(f"{_show(parts)}: a JSON {type(obj).__name__}, expected an object")
    if model is not None:
        try:
            model.model_validate(obj)
        except ValidationError as exc:
            raise FolderError(f"{_show(parts)}: {printable(describe(exc))}") from None
    return obj


def read_model(root: Path, parts: Sequence[str], max_bytes: int, model: type[M]) -> M:
    """A JSON object file as ``model``."""
    return model.model_validate(read_object(root, parts, max_bytes, model))


def list_dir(root: Path, parts: Sequence[str]) -> list[tuple[str, bool]]:
    """``(name, is a real folder)`` for each entry of ``root/parts...`` (links are not folders);
    an empty list when it does not exist."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise FolderError(f"cannot open {root}: {exc.strerror or exc}") from exc
    try:
        for part in parts:
            inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
        with os.scandir(fd) as entries:
            return sorted((e.name, e.is_dir(follow_symlinks=False)) for e in entries)
    except FileNotFoundError:
        return []
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise FolderError(f"{_show(parts)}: not a folder (links are not followed)") from exc
        raise FolderError(f"{_show(parts)}: cannot list: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


__all__ = ["FolderError", "MissingFile", "list_dir", "open_checked", "read_bytes", "read_model", "read_object"]
