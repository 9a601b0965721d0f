"""Reading JSON-lines files of objects (datasets, per-request rows) with line-numbered errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from rackscope.errors import RackscopeError


def read_objects(
    path: Path, error: type[RackscopeError], what: str = "", handle: IO[bytes] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line; anything else raises ``error`` naming
    the file (as ``what``, e.g. "dataset") and line. ``handle``: the file already opened (and
    checked) by the caller, read instead of opening ``path``."""
    if handle is None:
        try:
            handle = path.open("rb")
        except OSError as exc:
            raise error(f"cannot read {what + ' ' if what else ''}{path}: {exc.strerror or exc}") from exc
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise error(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
