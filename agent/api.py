"""The agent's control API (FastAPI): health, node view, fault injection and benchmark runs.

Every route is here; what stands behind them (``agent.runs``, ``agent.node``) raises our own
errors, mapped to status codes in ``_STATUS``. Before a route sees a request:

- a body larger than ``MAX_BODY_BYTES`` is refused with 413, counted as it streams in, not
  only from ``Content-Length``;
- on an API bound to loopback, a ``Host`` other than 127.0.0.1, localhost or [::1] (any port)
  is refused with 400: a web page that rebinds its own name to 127.0.0.1 cannot drive it;
- mutating calls need ``Authorization: Bearer <token>`` whenever the agent has a token
  (compared in constant time); an agent bound off loopback refuses to start without one.

Error bodies name the field and say what is wrong; they echo at most a few dozen characters
of what was sent.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rackscope import __version__
from rackscope.agent.faults import FAULTS, Fault, FaultName
from rackscope.agent.run_models import RunBody
from rackscope.agent.settings import is_loopback
from rackscope.contract import IDENTIFIER_PATTERN
from rackscope.errors import ConfigError, RackscopeError, ResultError, RunConflict, RunError, RunNotFound

if TYPE_CHECKING:
    from rackscope.agent.node import NodeAgent

MAX_BODY_BYTES = 64 * 1024  # the largest run body is a few KiB
# After a 413, up to this much of the rest of the body is read and dropped, so that a client
# still sending it gets to read the answer instead of a reset connection.
DRAIN_MAX_BYTES = 32 * 1024 * 1024
SHOWN_CHARS = 40  # of a rejected input, in an error body
MAX_ERRORS_SHOWN = 10
LOOPBACK_HOST = re.compile(r"(?:127\.0\.0\.1|localhost|\[::1\])(?::[0-9]{1,5})?")
RunId = Annotated[str, PathParam(pattern=IDENTIFIER_PATTERN, max_length=128)]

# Our errors -> HTTP status. ConfigError is the caller's mistake: 400 here, 422 for a run body.
_STATUS: tuple[tuple[type[RackscopeError], int], ...] = (
    (ConfigError, 400),
    (RunConflict, 409),
    (RunNotFound, 404),
    (RunError, 503),
)


class FaultBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Published inline, as a plain list of names, not as a reference to the enum's own schema.
    fault: Annotated[FaultName, WithJsonSchema({"enum": list(FAULTS), "title": "Fault", "type": "string"})] = Field(
        description="; ".join(f"{k}: {v}" for k, v in FAULTS.items())
    )
    gpu: int | None = Field(default=None, ge=0, le=1023, description="GPU index; omit for every GPU of the node")
    value: float | None = Field(default=None, gt=0, le=1e6, description="watts for power-cap, factor for engine-slow")


class Health(BaseModel):
    status: Literal["ok"]
    version: str


def _clip(value: Any, limit: int = SHOWN_CHARS) -> Any:
    """``value`` as an error body may show it: short strings and small numbers as they are."""
    if isinstance(value, bool) or value is None or (isinstance(value, float) and len(repr(value)) <= limit):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 64 else "(a number of more than 64 bits)"
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic's errors without what could be large: where, what, and a clipped input."""
    out: list[dict[str, Any]] = []
    for error in list(errors)[:MAX_ERRORS_SHOWN]:
        item: dict[str, Any] = {
            "loc": [_clip(part) for part in error.get("loc", ())],
            "msg": _clip(str(error.get("msg", "")), 200),
            "type": _clip(str(error.get("type", ""))),
        }
        if isinstance(error.get("input"), str | int | float | bool):
            item["input"] = _clip(error["input"])
        out.append(item)
    return out


async def _reply(send: Send, status: int, detail: str, *, close: bool = False) -> None:
    body = orjson.dumps({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware in front of FastAPI: the Host check and the body limit, applied before
    anything parses the request. The body is read here (never more than the limit kept) and
    handed on as one message."""

    def __init__(self, app: ASGIApp, *, check_host: bool, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.check_host = check_host
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers", ()))
        if self.check_host:
            hosts = [v.decode("latin-1").lower() for k, v in headers if k == b"host"]
            if len(hosts) != 1 or LOOPBACK_HOST.fullmatch(hosts[0]) is None:
                await _reply(send, 400, "this API is bound to loopback: the Host header must be 127.0.0.1, "
                                        "localhost or [::1], with an optional port")
                return
        too_big = f"request body larger than {self.max_body_bytes // 1024} KiB"
        lengths = [v for k, v in headers if k == b"content-length"]
        if lengths:
            try:
                declared = int(lengths[0])
            except ValueError:
                await _reply(send, 400, "Content-Length is not a number", close=True)
                return
            if declared > self.max_body_bytes:
                expects = any(k == b"expect" for k, _ in headers)
                if not expects and declared <= DRAIN_MAX_BYTES:
                    await self._drain(receive, 0)
                await _reply(send, 413, too_big, close=True)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, size)
                await _reply(send, 413, too_big, close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # what comes after the body: a disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _drain(receive: Receive, seen: int) -> None:
        while seen <= DRAIN_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


def create_app(agent: NodeAgent) -> FastAPI:
    app = FastAPI(
        title="rackscope agent",
        version=__version__,
        description="Control API of one rackscope node agent.",
    )
    token = agent.settings.api_token
    runs = agent.runs

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            return
        expected = f"Bearer {token}".encode()
        given = (authorization or "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            raise HTTPException(status_code=401, detail="missing or wrong token: send 'Authorization: Bearer <token>'")

    mutating = [Depends(require_token)]

    def ours(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
        async def handler(_: Request, exc: Exception) -> Response:
            return JSONResponse(status_code=status, content={"detail": str(exc)})

        return handler

    for kind, status in _STATUS:
        app.add_exception_handler(kind, ours(status))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": short_errors(exc.errors())})

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/v1/node", summary="Identity, source and every GPU with its latest sample")
    async def node() -> dict[str, Any]:
        return agent.node_view()

    @app.get("/v1/faults", summary="Injected faults (simulated nodes)")
    async def faults() -> dict[str, Any]:
        agent.require_sim("fault injection")
        return agent.fault_state()

    @app.post("/v1/faults", dependencies=mutating, summary="Inject a fault (simulated nodes)")
    async def inject(body: FaultBody) -> dict[str, Any]:
        agent.inject(Fault(body.fault, body.gpu, body.value))
        return agent.fault_state()

    @app.delete("/v1/faults", dependencies=mutating, summary="Clear every injected fault")
    async def clear() -> dict[str, Any]:
        agent.clear_faults()
        return agent.fault_state()

    @app.get("/v1/logs", response_class=PlainTextResponse, summary="Recent agent log lines")
    async def logs() -> str:
        return agent.log.text()

    # --- runs ------------------------------------------------------------------------------
    by_id = {"run_id": "$response.body#/run_id"}
    links = {
        "GetRun": {"operationId": "get_run", "parameters": by_id},
        "CancelRun": {"operationId": "cancel_run", "parameters": by_id},
        "GetRecord": {"operationId": "get_record", "parameters": by_id},
    }

    @app.post("/v1/runs", status_code=201, dependencies=mutating, summary="Start a benchmark run",
              operation_id="start_run", responses={201: {"description": "Started", "links": links}})
    async def start_run(body: RunBody) -> dict[str, Any]:  # type: ignore[valid-type]
        try:
            state = await runs.start(body.model_dump(exclude_none=True))  # type: ignore[attr-defined]
        except ConfigError as exc:  # the body parsed but its settings do not go together
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        return state.view()

    @app.get("/v1/runs", summary="Runs this agent knows, newest first", operation_id="list_runs")
    async def list_runs() -> list[dict[str, Any]]:
        return runs.views()

    @app.get("/v1/runs/{run_id}", summary="One run: status, config, summary", operation_id="get_run")
    async def get_run(run_id: RunId) -> dict[str, Any]:
        return runs.get(run_id).view()

    @app.get("/v1/runs/{run_id}/record", summary="The finished run's record (schema rackscope.run/1)",
             operation_id="get_record")
    async def get_record(run_id: RunId) -> dict[str, Any]:
        from rackscope.runner.results.io import record_of

        state = runs.get(run_id)
        if state.result is None:
            raise HTTPException(status_code=409, detail=f"run {run_id} is {state.status}: no record yet")
        written = Path(state.record_path) if state.record_path else None
        # Building a big run's record takes a while: off the event loop the node keeps sampling.
        try:
            return await asyncio.to_thread(record_of, state.result, written)
        except ResultError as exc:  # its rows no longer match it: say so, serve neither
            raise HTTPException(status_code=500, detail=str(exc)) from exc

    @app.get("/v1/runs/{run_id}/requests", summary="The finished run's per-request rows (JSON lines)",
             operation_id="get_requests")
    async def get_requests(run_id: RunId) -> Response:
        from rackscope.runner.results.io import rows_of

        state = runs.get(run_id)
        if state.result is None:
            raise HTTPException(status_code=409, detail=f"run {run_id} is {state.status}: no record yet")
        written = Path(state.record_path) if state.record_path else None
        try:
            body = await asyncio.to_thread(rows_of, state.result, written)
        except ResultError as exc:  # the rows file is not the one the record names
            raise HTTPException(status_code=500, detail=str(exc)) from exc
        return Response(content=body, media_type="application/x-ndjson")

    @app.post("/v1/runs/{run_id}/cancel", dependencies=mutating, summary="Cancel a run", operation_id="cancel_run")
    async def cancel_run(run_id: RunId) -> dict[str, Any]:
        return runs.cancel(run_id).view()

    app.add_middleware(Guard, check_host=is_loopback(agent.settings.api_host))
    return app
