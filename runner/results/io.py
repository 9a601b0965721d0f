"""Writing a run to disk and reading it back: the per-request rows first, then the record that
names them by row count, size and SHA-256; loaders refuse a record and rows that do not
belong together (see docs/results-schema.md, "Record and rows")."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from rackscope.errors import ResultError
from rackscope.fileio import atomic_writer, dumps, write_json
from rackscope.jsontypes import JsonDict
from rackscope.runner.jsonl import read_objects
from rackscope.runner.results.record import LATENCY_KEYS, REQUIRED_SUMMARY_KEYS, RowsDigest, RunResult

REQUESTS_SUFFIX = ".requests.jsonl"
_READ_CHUNK_BYTES = 1 << 20


def requests_path(path: Path) -> Path:
    """``out.json`` -> ``out.requests.jsonl`` beside it."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(stem + REQUESTS_SUFFIX)


# --- rows and their digest -------------------------------------------------------------------------
class _RowsHasher:
    """Counts rows and bytes and hashes them, as they are written or read back."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._rows = 0
        self._bytes = 0

    def update(self, data: bytes) -> None:
        self._sha.update(data)
        self._rows += data.count(b"\n")
        self._bytes += len(data)

    def digest(self) -> RowsDigest:
        return RowsDigest(self._rows, self._bytes, self._sha.hexdigest())


def encode_row(row: Mapping[str, Any]) -> bytes:
    """One row as the rows file holds it: compact JSON and a newline. The file and the
    agent's ``/requests`` answer both use this, so their digests agree."""
    try:
        return orjson.dumps(row) + b"\n"
    except TypeError as exc:
        raise ResultError(f"request row is not serialisable: {exc}") from exc


def encode_rows(rows: Iterable[Mapping[str, Any]]) -> tuple[bytes, RowsDigest]:
    """All rows as one body, with the digest a record would carry for them."""
    hasher = _RowsHasher()
    parts = []
    for row in rows:
        line = encode_row(row)
        hasher.update(line)
        parts.append(line)
    return b"".join(parts), hasher.digest()


def write_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> RowsDigest:
    """Write a rows file atomically and return its digest."""
    hasher = _RowsHasher()
    try:
        with atomic_writer(path) as handle:
            for row in rows:
                line = encode_row(row)
                handle.write(line)
                hasher.update(line)
    except OSError as exc:
        raise ResultError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return hasher.digest()


def digest_file(path: Path) -> RowsDigest:
    """The digest of a rows file as it is on disk."""
    hasher = _RowsHasher()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_READ_CHUNK_BYTES):
                hasher.update(chunk)
    except OSError as exc:
        raise ResultError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return hasher.digest()


def write_run(result: RunResult, path: str | Path) -> Path:
    """Write the per-request rows, then the record that names them with their digest; each
    atomically. A crash between the two leaves at worst a record whose rows no longer match
    it, which every loader refuses; never a pair that passes for one run."""
    path = Path(path)
    rows_path = requests_path(path)
    record = result.to_record(requests_file=rows_path.name)
    dumps(record)  # a record that cannot be serialised fails here, before any file is touched
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultError(f"cannot create {path.parent}: {exc.strerror or exc}") from exc
    record["requests_digest"] = write_rows(rows_path, result.request_rows()).to_json()
    write_json(path, record)
    return path


# --- loading ---------------------------------------------------------------------------------------
def load_json(path: str | Path) -> JsonDict:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ResultError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ResultError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ResultError(f"{path}: expected a JSON object")
    return obj


def check_schema(path: Path | str, obj: Mapping[str, Any], families: Sequence[str] = ("rackscope.run",)) -> str:
    """The record's schema string, after checking it is a known family at major version 1."""
    schema = obj.get("schema")
    if not isinstance(schema, str) or "/" not in schema:
        raise ResultError(f"{path}: no 'schema' field; not a rackscope record")
    family, _, version = schema.partition("/")
    if family not in families:
        raise ResultError(f"{path}: schema {schema!r} is not one of {', '.join(f + '/1' for f in families)}")
    if version.split(".")[0] != "1":
        raise ResultError(f"{path}: schema version {schema!r} is not supported (this rackscope reads version 1)")
    return schema


def load_run(path: str | Path, *, check_rows: bool = True) -> JsonDict:
    """Read a run record, checking the schema version, the summary's required keys and, with
    ``check_rows``, that the rows file beside it (when there is one) is the one it names."""
    obj = load_json(path)
    check_schema(path, obj)
    summary = obj.get("summary")
    if not isinstance(summary, dict):
        raise ResultError(f"{path}: 'summary' missing or not an object")
    missing = [k for k in REQUIRED_SUMMARY_KEYS if k not in summary]
    if missing:
        raise ResultError(f"{path}: summary lacks {', '.join(missing)}")
    for key in LATENCY_KEYS:
        if not isinstance(summary[key], dict):
            raise ResultError(f"{path}: summary.{key} must be an object of percentiles")
    for key in ("config", "environment"):
        if not isinstance(obj.get(key), dict):
            raise ResultError(f"{path}: {key!r} missing or not an object")
    RowsDigest.from_record(obj, path)
    if check_rows:
        verify_rows(path, obj)
    return obj


def rows_file(path: str | Path, record: Mapping[str, Any]) -> Path | None:
    """The rows file a record at ``path`` names (always beside it), or ``None``."""
    name = record.get("requests_file")
    if not isinstance(name, str) or not name:
        return None
    return Path(path).parent / Path(name).name


def _check_digest(path: str | Path, rows: Path, want: RowsDigest, got: RowsDigest) -> None:
    if got != want:
        raise ResultError(
            f"{rows} does not belong to the record {path}: the record names {want.rows} rows, "
            f"{want.size_bytes} bytes, sha256 {want.sha256[:16]}..., the file has {got.rows} rows, "
            f"{got.size_bytes} bytes, sha256 {got.sha256[:16]}... (a write was interrupted or the "
            "files come from different runs); rerun, or keep the record and set the rows file aside"
        )


def verify_rows(path: str | Path, record: Mapping[str, Any]) -> Path | None:
    """Check the rows file a record names against the record's digest; the rows path when
    it is there. A record without a digest (written before it existed) or whose rows file is
    absent passes: there is nothing to mismatch."""
    rows = rows_file(path, record)
    if rows is None or not rows.exists():
        return None
    want = RowsDigest.from_record(record, path)
    if want is not None:
        _check_digest(path, rows, want, digest_file(rows))
    return rows


def read_rows(path: str | Path) -> bytes:
    """The rows file named by the record at ``path``, as bytes, checked against the record."""
    record = load_run(path, check_rows=False)
    rows = rows_file(path, record)
    if rows is None:
        raise ResultError(f"{path}: the record names no per-request rows file")
    try:
        data = rows.read_bytes()
    except OSError as exc:
        raise ResultError(f"cannot read {rows}: {exc.strerror or exc}") from exc
    want = RowsDigest.from_record(record, path)
    if want is not None:
        hasher = _RowsHasher()
        hasher.update(data)
        _check_digest(path, rows, want, hasher.digest())
    return data


def load_requests(path: str | Path) -> Iterator[JsonDict]:
    """Rows of a ``.requests.jsonl`` file (unchecked: ``verify_rows`` ties them to a record)."""
    for _, row in read_objects(Path(path), ResultError):
        yield row


# --- a hosted run's record and rows ------------------------------------------------------------------
def record_of(result: RunResult, written: Path | None) -> JsonDict:
    """The record of ``result``: as written at ``written`` (refused when its rows do not match
    it), else built from memory, naming the rows ``rows_of`` gives by their digest."""
    if written is not None:
        return load_run(written)
    _, digest = encode_rows(result.request_rows())
    name = requests_path(Path(f"{result.run_id}.json")).name
    return result.to_record(requests_file=name, requests_digest=digest)


def rows_of(result: RunResult, written: Path | None) -> bytes:
    """The per-request rows of ``result``: the file beside ``written``, checked against that
    record, else encoded from memory exactly as the file would be."""
    if written is not None:
        return read_rows(written)
    return encode_rows(result.request_rows())[0]
