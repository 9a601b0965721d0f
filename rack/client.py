"""The HTTP client for one agent's control API: bounded calls, checked answers.

Every call is bounded by a whole-operation deadline and a size cap (after decompression), and
every answer is checked against the agent's API (rack/answers.py) before anything in it is used.

What can go wrong with a call, as ``rackscope.errors.PeerError`` subclasses that never leave
the rack package::

    PeerError
    ├── AgentUnreachable    no answer: connection refused or reset, or a gateway saying so
    │   └── AgentHung       the whole answer did not arrive within the call's deadline
    └── BadAnswer           an answer the agent's API never gives: status, type, size or shape
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from rackscope.errors import PeerError, ResultError
from rackscope.fileio import atomic_writer
from rackscope.jsontypes import JsonDict
from rackscope.peers import CHUNK_BYTES, read_capped
from rackscope.rack.answers import NodeAnswer, RunRecord, RunView, describe
from rackscope.rack.spec import MIB, AnswerCaps
from rackscope.runner.results.io import check_schema
from rackscope.runner.results.record import LATENCY_KEYS, REQUIRED_SUMMARY_KEYS, RowsDigest
from rackscope.urls import redact_in, redact_url

if TYPE_CHECKING:
    import aiohttp
    from pydantic import BaseModel

GATEWAY_STATUSES = (502, 503, 504)  # a proxy in front of the agent could not reach it
MAX_DETAIL_CHARS = 300
JSON_TYPE = "application/json"


class AgentUnreachable(PeerError):
    """The agent gave no answer: connection refused or reset, or a gateway could not reach it."""


class AgentHung(AgentUnreachable):
    """The agent did not deliver its whole answer within the call's deadline."""


class BadAnswer(PeerError):
    """The agent answered, but not as its API does: wrong status, content type, size or shape."""


@dataclass(frozen=True)
class Refusal:
    """The agent declined to start the run (HTTP 4xx or 5xx) and said why."""

    status: int
    detail: str


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


def printable(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """Peer-supplied text made safe to print on a terminal and bounded in length."""
    cut = text[:limit]
    clean = "".join(ch if ch.isprintable() else (" " if ch in "\t\r\n" else "?") for ch in cut)
    return clean + ("..." if len(text) > limit else "")


def detail(payload: bytes) -> str:
    """What an error answer says: FastAPI's ``detail``, else the start of the body."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and "detail" in obj:
        return printable(str(obj["detail"]))
    return printable(payload[: MAX_DETAIL_CHARS * 4].decode(errors="replace").strip()) or "(no body)"


def record_problem(record: JsonDict, run_id: str, where: str) -> str | None:
    """What is wrong with a node's run record beyond its shape (``RunRecord``): another run's
    record, an unknown schema, a malformed rows digest, a summary without the figures a record
    carries; None when nothing is. ``where`` names the record in the message."""
    if record["run_id"] != run_id:
        return f"{where}: the record is of run {printable(record['run_id'])!r}"
    try:
        check_schema(where, record)
        RowsDigest.from_record(record, where)
    except ResultError as exc:
        return printable(str(exc))
    summary = record["summary"]
    missing = [key for key in REQUIRED_SUMMARY_KEYS if key not in summary]
    if missing:
        return f"{where}: summary lacks {', '.join(missing)}"
    for key in LATENCY_KEYS:
        if not isinstance(summary[key], dict):
            return f"{where}: summary.{key} must be an object of percentiles"
    return None


def _json_kind(obj: Any) -> str:
    for kind, name in ((list, "array"), (str, "string"), (bool, "boolean"), (int, "number"), (float, "number")):
        if isinstance(obj, kind):
            return name
    return "null"


def _size(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n} bytes"


class AgentClient:
    """The control API of the agent at ``base_url``; ``shown`` is its URL without credentials."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        token: str | None,
        call_timeout_s: float,
        collect_timeout_s: float,
        caps: AnswerCaps,
    ) -> None:
        self.session = session
        self.base_url = base_url
        self.shown = redact_url(base_url)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.call_timeout_s = call_timeout_s
        self.collect_timeout_s = collect_timeout_s
        self.caps = caps

    # --- the calls -------------------------------------------------------------------------
    async def identity(self) -> JsonDict:
        """``GET /v1/node``."""
        call = "GET /v1/node"
        answer = await self._exchange("GET", "/v1/node", timeout_s=self.call_timeout_s)
        self._gateway(call, answer)
        return self._object(call, answer, 200, NodeAnswer)

    async def start(self, body: JsonDict, run_id: str) -> JsonDict | Refusal:
        """``POST /v1/runs``: the run's view, or why the agent refused it."""
        call = "POST /v1/runs"
        answer = await self._exchange("POST", "/v1/runs", body=body, timeout_s=self.call_timeout_s)
        if answer.status != 201 and 400 <= answer.status < 600:
            return Refusal(answer.status, detail(answer.body))
        return self._run_view(call, answer, 201, run_id)

    async def view(self, run_id: str) -> JsonDict:
        """``GET /v1/runs/{id}``."""
        call = f"GET /v1/runs/{run_id}"
        answer = await self._exchange("GET", f"/v1/runs/{run_id}", timeout_s=self.call_timeout_s)
        self._gateway(call, answer)
        if answer.status == 404:
            raise BadAnswer(f"{call}: the agent no longer knows the run (restarted?): {detail(answer.body)}")
        return self._run_view(call, answer, 200, run_id)

    async def cancel(self, run_id: str, timeout_s: float) -> str | None:
        """``POST /v1/runs/{id}/cancel``: the run's status after it, or None when the agent has
        no such run (a start that never landed)."""
        call = f"POST /v1/runs/{run_id}/cancel"
        answer = await self._exchange("POST", f"/v1/runs/{run_id}/cancel", timeout_s=timeout_s)
        if answer.status == 404:
            return None
        self._gateway(call, answer)
        return str(self._run_view(call, answer, 200, run_id)["status"])

    async def record(self, run_id: str) -> tuple[JsonDict, bytes] | None:
        """``GET /v1/runs/{id}/record``: the record and its bytes as sent, or None while the
        agent has none yet (409)."""
        call = f"GET /v1/runs/{run_id}/record"
        answer = await self._exchange(
            "GET", f"/v1/runs/{run_id}/record", timeout_s=self.collect_timeout_s, max_bytes=self.caps.record_bytes
        )
        if answer.status == 409:
            return None
        self._gateway(call, answer)
        record = self._object(call, answer, 200, RunRecord)
        problem = record_problem(record, run_id, call)
        if problem is not None:
            raise BadAnswer(problem)
        return record, answer.body

    async def requests(self, run_id: str, target: Path, digest: RowsDigest | None) -> int | None:
        """Stream ``GET /v1/runs/{id}/requests`` into ``target`` atomically, checked against the
        record's ``digest`` when it has one; the size, or None when the agent has no rows."""
        import aiohttp

        call = f"GET /v1/runs/{run_id}/requests"
        cap = self.caps.requests_bytes
        try:
            async with asyncio.timeout(self.collect_timeout_s):
                async with self.session.get(
                    self.base_url + f"/v1/runs/{run_id}/requests", headers=self.headers, allow_redirects=False
                ) as resp:
                    if resp.status in (404, 409):
                        return None
                    if resp.status != 200:
                        body = await read_capped(resp, self.caps.answer_bytes, call)
                        raise BadAnswer(f"{call}: HTTP {resp.status}: {detail(body)}")
                    sha, rows, size = hashlib.sha256(), 0, 0
                    with atomic_writer(target) as handle:
                        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                            size += len(chunk)
                            if size > cap:
                                raise BadAnswer(f"{call} sent more than {_size(cap)}")
                            handle.write(chunk)
                            sha.update(chunk)
                            rows += chunk.count(b"\n")  # one row per line, as the record counts them
                        got = RowsDigest(rows, size, sha.hexdigest())
                        if digest is not None and got != digest:
                            raise BadAnswer(
                                f"{call}: the rows do not match the record ({got.rows} rows, {got.size_bytes} "
                                f"bytes sent; the record names {digest.rows} rows, {digest.size_bytes} bytes)"
                            )
                    return size
        except TimeoutError as exc:
            raise AgentHung(f"{call} did not finish within {self.collect_timeout_s:g} s") from exc
        except PeerError as exc:
            if isinstance(exc, AgentUnreachable | BadAnswer):
                raise
            raise BadAnswer(printable(str(exc))) from exc
        except aiohttp.ClientConnectionError as exc:
            raise AgentUnreachable(f"{call}: {self._describe(exc)}") from exc
        except aiohttp.ClientError as exc:
            raise BadAnswer(f"{call}: {self._describe(exc)}") from exc
        except OSError as exc:
            raise ResultError(f"cannot write {target}: {exc.strerror or exc}") from exc

    async def logs(self) -> bytes:
        """``GET /v1/logs``: the agent's recent log lines."""
        call = "GET /v1/logs"
        answer = await self._exchange("GET", "/v1/logs", timeout_s=self.call_timeout_s, max_bytes=self.caps.log_bytes)
        self._gateway(call, answer)
        if answer.status != 200:
            raise BadAnswer(f"{call}: HTTP {answer.status}: {detail(answer.body)}")
        return answer.body

    # --- one exchange ------------------------------------------------------------------------
    async def _exchange(
        self, method: str, path: str, *, timeout_s: float, max_bytes: int | None = None, body: Any = None
    ) -> Answer:
        """One request and its whole answer, within ``timeout_s`` and ``max_bytes``."""
        import aiohttp

        call = f"{method} {path}"
        data = orjson.dumps(body) if body is not None else None
        headers = {**self.headers, "Content-Type": JSON_TYPE} if data is not None else self.headers
        try:
            async with asyncio.timeout(timeout_s):
                async with self.session.request(
                    method, self.base_url + path, data=data, headers=headers, allow_redirects=False
                ) as resp:
                    payload = await read_capped(resp, max_bytes or self.caps.answer_bytes, call)
                    return Answer(resp.status, resp.content_type, payload)
        except TimeoutError as exc:
            raise AgentHung(f"{call} did not answer within {timeout_s:g} s") from exc
        except PeerError as exc:  # read_capped: too large, or not decodable
            raise BadAnswer(printable(str(exc))) from exc
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise AgentUnreachable(f"{call}: {self._describe(exc)}") from exc
        except aiohttp.ClientError as exc:  # a malformed status line, header or body encoding
            raise BadAnswer(f"{call}: {self._describe(exc)}") from exc

    def _describe(self, exc: BaseException) -> str:
        text = str(exc)
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return printable(redact_in(text, self.base_url))

    @staticmethod
    def _gateway(call: str, answer: Answer) -> None:
        if answer.status in GATEWAY_STATUSES:
            raise AgentUnreachable(f"{call}: HTTP {answer.status} from a gateway: {detail(answer.body)}")

    def _run_view(self, call: str, answer: Answer, expect: int, run_id: str) -> JsonDict:
        view = self._object(call, answer, expect, RunView)
        if view["run_id"] != run_id:
            raise BadAnswer(f"{call}: the answer is about run {printable(view['run_id'])!r}")
        return view

    @staticmethod
    def _object(call: str, answer: Answer, expect: int, model: type[BaseModel]) -> JsonDict:
        """The answer as a JSON object matching ``model``, or ``BadAnswer`` saying what is wrong."""
        if answer.status != expect:
            raise BadAnswer(f"{call}: HTTP {answer.status} instead of {expect}: {detail(answer.body)}")
        if answer.content_type != JSON_TYPE:
            raise BadAnswer(f"{call}: the answer is {printable(answer.content_type or 'untyped', 80)}, not JSON")
        try:
            obj = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            raise BadAnswer(f"{call}: the answer is not JSON") from None
        if not isinstance(obj, dict):
            raise BadAnswer(f"{call}: the answer is a JSON {_json_kind(obj)}, expected an object")
        try:
            model.model_validate(obj)
        except ValidationError as exc:
            raise BadAnswer(f"{call}: {printable(describe(exc))}") from None
        return obj


__all__ = ["AgentClient", "AgentHung", "AgentUnreachable", "Answer", "BadAnswer", "Refusal", "detail", "printable",
           "record_problem"]
