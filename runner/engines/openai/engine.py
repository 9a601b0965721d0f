"""The ``openai`` engine: requests out over a pool of keep-alive connections, results in."""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import time
from collections.abc import AsyncIterator
from typing import Literal
from urllib.parse import urlsplit

import orjson

from rackscope.errors import EngineUnavailable
from rackscope.runner.config import DEFAULT_REQUEST_DEADLINE_S, DEFAULT_REQUEST_TIMEOUT_S
from rackscope.runner.engines.base import EngineEvent, Failed, FirstToken, Request, Tokens
from rackscope.runner.engines.openai.sinks import BodySink, EventSink, RecordSink, Sink
from rackscope.runner.engines.openai.wire import Conn, Pool
from rackscope.runner.records import RequestRecord

_now = time.perf_counter

# The defaults are the run settings' own (declared once in runner.config): DEFAULT_TIMEOUT_S is the
# longest silence from the server (before headers, between chunks); DEFAULT_REQUEST_DEADLINE_S the
# longest a whole request may take, first byte out to last byte in, which bounds a server that
# keeps talking and never finishes (an endless or trickling stream).
DEFAULT_TIMEOUT_S = DEFAULT_REQUEST_TIMEOUT_S
DEFAULT_CONNECT_TIMEOUT_S = 10.0
WATCH_INTERVAL_S = 1.0  # how often, at most, in-flight requests are checked for both limits

ApiName = Literal["completions", "chat"]


class OpenAIEngine:
    """Streams requests to an OpenAI-compatible server; see the package docstring.

    ``base_url`` is the server root, with or without the ``/v1`` suffix
    (``http://127.0.0.1:8000`` and ``http://127.0.0.1:8000/v1`` mean the same). An empty
    ``model`` means "the first model the server lists", filled in by ``start()``.
    ``timeout_s`` is the longest the server may stay silent (waiting for the response head
    or between chunks); ``request_deadline_s`` the longest a whole request may take. Both
    fail the request with ``timeout``, the message saying which.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api: ApiName = "completions",
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        ssl_context: ssl_module.SSLContext | None = None,
        request_deadline_s: float = DEFAULT_REQUEST_DEADLINE_S,
    ) -> None:
        if api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', not {api!r}")
        if not (timeout_s > 0 and connect_timeout_s > 0 and request_deadline_s > 0):
            raise ValueError("timeouts and the request deadline must be positive")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL, not {base_url!r}")
        self.base_url = base_url
        self.model = model
        self.api: ApiName = api
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.request_deadline_s = request_deadline_s
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl_module.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context or ssl_module.create_default_context()
        prefix = parts.path.rstrip("/")
        prefix = prefix.removesuffix("/v1")
        self._models_path = f"{prefix}/v1/models"
        path = f"{prefix}/v1/chat/completions" if api == "chat" else f"{prefix}/v1/completions"
        host_header = parts.netloc.rpartition("@")[2]
        common = f"Host: {host_header}\r\nUser-Agent: rackscope\r\n"
        if api_key:
            if any(c in api_key for c in "\r\n"):
                raise ValueError("api_key must not contain line breaks")
            common += f"Authorization: Bearer {api_key}\r\n"
        self._post_head = (
            f"POST {path} HTTP/1.1\r\n{common}Accept: text/event-stream\r\nContent-Type: application/json\r\n"
        ).encode("latin-1")
        self._get_models = f"GET {self._models_path} HTTP/1.1\r\n{common}Accept: application/json\r\n\r\n".encode(
            "latin-1"
        )
        self._chat = api == "chat"
        self._pool = Pool()
        self._watchdog: asyncio.TimerHandle | None = None
        self.error_counts = self._pool.error_counts  # failures by type, shared with the connections
        self.served_models: list[str] = []

    # -- Engine protocol ---------------------------------------------------------------------

    def now(self) -> float:
        return _now()

    async def start(self) -> None:
        """Check the server answers ``GET /v1/models`` and serves ``model``."""
        where = f"{self.base_url} ({self._models_path})"
        hint = "start the server (trtllm-serve, vllm serve, ...) or fix --base-url"
        try:
            conn = await self._connect()
        except (OSError, TimeoutError) as exc:
            raise EngineUnavailable(f"cannot reach OpenAI-compatible server at {where}: {exc} (hint: {hint})") from exc
        fut: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        conn.send(self._get_models, BodySink(fut), False, _now() + self.connect_timeout_s + 5.0)
        try:
            async with asyncio.timeout(self.connect_timeout_s + 5.0):
                error_type, text = await fut
        except TimeoutError as exc:
            conn.abort("timeout", "no answer to GET /v1/models")
            raise EngineUnavailable(f"server at {where} did not answer (hint: {hint})") from exc
        if error_type:
            raise EngineUnavailable(f"server at {where} answered {text} (hint: is this an OpenAI-compatible server?)")
        try:
            listing = orjson.loads(text)
            ids = [str(m["id"]) for m in listing["data"]]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise EngineUnavailable(f"server at {where} sent a malformed model list: {text[:200]!r}") from exc
        self.served_models = ids
        if not self.model:
            if not ids:
                raise EngineUnavailable(f"server at {where} serves no model")
            self.model = ids[0]
        elif self.model not in ids:
            raise EngineUnavailable(
                f"model {self.model!r} is not served at {self.base_url}; served: {', '.join(ids) or 'none'} "
                "(hint: pass one of these as the model)"
            )
        self._ensure_watchdog()

    async def stop(self) -> None:
        """Fail what is in flight with ``cancelled`` and close every connection."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pool = self._pool
        for conn in list(pool.active):
            conn.abort("cancelled", "engine stopped")
        for conn in pool.idle:
            conn.abort("cancelled", "engine stopped")
        pool.idle.clear()
        pool.active.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks

    async def prewarm(self, connections: int) -> int:
        """Open keep-alive connections ahead of a burst, so no request pays for a connect.

        Returns how many idle connections the pool holds afterwards.
        """
        idle = self._pool.idle
        need = connections - sum(1 for c in idle if not c.closed)
        if need > 0:
            conns = await asyncio.gather(*(self._connect() for _ in range(need)), return_exceptions=True)
            for c in conns:
                if isinstance(c, Conn):
                    idle.append(c)
                elif isinstance(c, BaseException) and not isinstance(c, Exception):
                    raise c
        return sum(1 for c in idle if not c.closed)

    async def stream(self, request: Request) -> AsyncIterator[EngineEvent]:
        """Stream one request; yields FirstToken, Tokens..., then Done or Failed."""
        sink = EventSink(request.input_tokens)
        conn = await self._begin(request, sink)
        if conn is None:
            for ev in sink.events:
                yield ev
            return
        loop = asyncio.get_running_loop()
        first = True
        retried = False
        try:
            while True:
                events = sink.events
                if not events:
                    sink.waiter = loop.create_future()
                    await sink.waiter
                    sink.waiter = None
                    continue
                sink.events = []
                if first and not retried and self._stale_failure(conn, events[0]):
                    retried = True
                    sink = EventSink(request.input_tokens)
                    again = await self._begin(request, sink, fresh=True)
                    if again is None:
                        for ev in sink.events:
                            yield ev
                        return
                    conn = again
                    continue
                for ev in events:
                    if first and isinstance(ev, Tokens):
                        first = False
                        yield FirstToken(ev.t, ev.count)
                    else:
                        first = False
                        yield ev
                if sink.finished:
                    return
        finally:
            if not sink.finished:
                # The consumer stopped early or was cancelled: the response is unread.
                conn.abort("cancelled", "stream closed by the consumer")

    def live_output_tokens(self) -> dict[int | None, int]:
        """Content chunks received so far by the requests in flight through ``record``
        (``CountsLiveTokens``), all under ``None`` (a server does not say which GPU): the
        length of each one's arrival array, summed. Safe to call from another thread while the
        loop runs; a request leaves the sum when its response ends, before ``record`` returns it."""
        try:
            conns = tuple(self._pool.active)  # one C-level copy: no Python code runs meanwhile
        except RuntimeError:  # the set changed under a copy from another thread: next time
            return {}
        total = 0
        for conn in conns:
            arrivals = conn.arrivals
            if arrivals is not None and not conn.ended:
                total += len(arrivals)
        return {None: total} if total else {}

    async def record(self, request: Request) -> RequestRecord:
        """Run one request into a ``RequestRecord`` (the lean path the load generator uses).

        ``start_s`` is when the request's bytes were handed to the transport (a request that
        fails before that keeps the time ``record`` was called)."""
        rec = RequestRecord(
            request_id=request.request_id,
            start_s=_now(),
            input_tokens=request.input_tokens,
            output_tokens_method="counted",
            itl_s=[],
        )
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            fut: asyncio.Future[None] = loop.create_future()
            sink = RecordSink(rec, fut)
            conn = await self._begin(request, sink, fresh=attempt > 0)
            if conn is None:
                return rec
            try:
                await fut
            except asyncio.CancelledError:
                conn.abort("cancelled", "request cancelled")
                raise
            if attempt == 0 and not rec.ok and rec.error_type == "connect" and conn.reused and not conn.got_bytes:
                # A keep-alive connection the server had just closed: retry once on a new one.
                self.error_counts["connect"] -= 1
                rec.error_type = rec.error = None
                rec.end_s = None
                continue
            break
        return rec

    # -- internals ------------------------------------------------------------------------

    def _stale_failure(self, conn: Conn, ev: EngineEvent) -> bool:
        if isinstance(ev, Failed) and ev.error_type == "connect" and conn.reused and not conn.got_bytes:
            self.error_counts["connect"] -= 1
            return True
        return False

    def _body_bytes(self, request: Request) -> bytes | None:
        body: dict[str, object]
        if self._chat:
            if request.prompt is None:
                return None
            body = {
                "model": self.model,
                "messages": [{"role": "user", "content": request.prompt}],
                "max_tokens": request.max_output_tokens,
                "max_completion_tokens": request.max_output_tokens,
            }
        else:
            prompt: object = request.prompt if request.prompt is not None else request.input_ids
            if prompt is None:
                return None
            body = {"model": self.model, "prompt": prompt, "max_tokens": request.max_output_tokens}
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        if request.ignore_eos:
            body["ignore_eos"] = True
            body["min_tokens"] = request.max_output_tokens
        if request.extra:
            body.update(request.extra)
        return orjson.dumps(body)

    async def _connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            _, proto = await loop.create_connection(
                lambda: Conn(self._pool),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
            )
        return proto

    async def _acquire(self, fresh: bool) -> Conn:
        idle = self._pool.idle
        while idle and not fresh:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return await self._connect()

    async def _begin(self, request: Request, sink: Sink, fresh: bool = False) -> Conn | None:
        """Send the request on a pooled connection; None when it failed before sending."""
        # The deadline runs from here, so a connect that has to happen first counts against it.
        deadline_s = _now() + self.request_deadline_s
        body = self._body_bytes(request)
        if body is None:
            what = "a text prompt" if self._chat else "a prompt or input_ids"
            self.error_counts["engine"] += 1
            sink.failed(_now(), "engine", f"request {request.request_id} has no {what} for the {self.api} API", 0)
            return None
        try:
            conn = await self._acquire(fresh)
        except TimeoutError:
            self.error_counts["timeout"] += 1
            msg = f"connect to {self._host}:{self._port} took over {self.connect_timeout_s:g} s"
            sink.failed(_now(), "timeout", msg, 0)
            return None
        except (OSError, ssl_module.SSLError) as exc:
            self.error_counts["connect"] += 1
            sink.failed(_now(), "connect", f"cannot connect to {self._host}:{self._port}: {exc}", 0)
            return None
        rid = request.request_id
        extra_head = b"Content-Length: %d\r\n" % len(body)
        if rid.isprintable() and len(rid) < 256:
            extra_head += b"X-Request-Id: " + rid.encode("utf-8", "replace") + b"\r\n"
        conn.send(self._post_head + extra_head + b"\r\n" + body, sink, self._chat, deadline_s)
        self._ensure_watchdog()
        return conn

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None:
            interval_s = min(WATCH_INTERVAL_S, self.timeout_s / 4, self.request_deadline_s / 4)
            self._watchdog = asyncio.get_running_loop().call_later(interval_s, self._watch, interval_s)

    def _watch(self, interval_s: float) -> None:
        # One timer for the whole engine instead of one per read: re-arming a timer on every
        # chunk would cost more than parsing it.
        now = _now()
        silent_since = now - self.timeout_s
        for conn in [c for c in self._pool.active if c.last_io_s < silent_since or c.deadline_s < now]:
            if conn.deadline_s < now:
                conn.abort("timeout", f"request passed its deadline of {self.request_deadline_s:g} s")
            else:
                conn.abort("timeout", f"server silent for over {self.timeout_s:g} s")
        self._watchdog = asyncio.get_running_loop().call_later(interval_s, self._watch, interval_s)


def is_available() -> bool:
    """The engine needs nothing beyond the core dependencies; reachability is ``start()``'s job."""
    return True
