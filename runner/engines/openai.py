"""The ``openai`` engine: a lean streaming client for OpenAI-compatible servers.

It talks to trtllm-serve, vLLM, SGLang and NIM over ``/v1/completions`` or
``/v1/chat/completions`` with ``stream: true``. The point is to cost the client as little
CPU per streamed token as possible, so that a load generator on a few cores keeps up with
a whole node and its timestamps stay close to when the bytes arrived.

How it stays cheap (measured against aiohttp + orjson by ``benchmarks/loadgen.py``):

- A raw ``asyncio.Protocol`` HTTP/1.1 client (no StreamReader, no line iteration) with a
  keep-alive connection pool (``prewarm(n)`` opens connections ahead of a burst). The
  arrival time is taken first thing in ``data_received`` with ``time.perf_counter()``.
- Chunked transfer decoding on ``bytes``, and a fast path for the steady state, a read of
  whole chunks holding whole events, that checks the framing with two ``bytes.count``
  calls and never slices the data.
- No JSON decoding per chunk. Content chunks are counted with ``bytes.count`` on
  ``"text":"`` (completions) or ``"content":"`` (chat) minus empty ones; a literal quote
  inside a JSON string is always escaped, so these patterns only match JSON structure.
  Spaced JSON (``"text": "``) is recognised per response; ``reasoning_content`` /
  ``reasoning`` chunks of reasoning models count too. Only the chunk carrying the usage
  and error events are decoded in full.
- One ``Tokens`` event per socket read that carries content, not one per token; and
  ``record()`` appends arrival times from ``data_received`` with a C-level
  ``list.append``, waking the awaiting task once per request instead of once per read.
- Run it on uvloop (``runner.workers.new_event_loop``): about half the CPU per token of
  asyncio's own loop. What is left per token is mostly the kernel's (epoll, recv, ACKs).

Counting rules: output tokens come from the server's final ``usage`` chunk when it sends
one (``output_tokens_method="usage"``), else from counted content chunks (``"counted"``,
exact when the server sends one token per chunk). Failures never raise out of a stream:
they end it with ``Failed`` whose ``error_type`` is one of ``connect`` (refused, reset
before any response byte, DNS), ``timeout`` (connect took longer than
``connect_timeout_s`` or the server was silent for ``timeout_s``), ``http_4xx`` /
``http_5xx`` (with the server's reason), ``protocol`` (malformed response, stream cut
short, server-sent ``error`` event), ``cancelled`` (the engine was stopped, or the
consumer left the stream early) or ``engine`` (a request the API cannot carry). The engine
counts them by type in ``error_counts``. A keep-alive connection that the server closed
just as a request went out is retried once on a new connection.

HTTPS uses asyncio's own TLS support (``loop.create_connection(ssl=...)``), so the same
protocol serves both; pass ``ssl_context`` to trust a private CA. Times are
``time.perf_counter()`` seconds, which on Linux is ``CLOCK_MONOTONIC``: the same clock in
every process, so records from several worker processes compare directly. An engine and
its connections belong to the event loop that first used them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
import time
from collections import Counter
from collections.abc import AsyncIterator
from operator import sub
from typing import Literal, cast
from urllib.parse import urlsplit

import orjson

from rackscope.errors import EngineUnavailable
from rackscope.runner.engines.base import Done, EngineEvent, Failed, FirstToken, Request, Tokens
from rackscope.runner.records import RequestRecord

log = logging.getLogger(__name__)

_now = time.perf_counter

DEFAULT_TIMEOUT_S = 600.0  # longest silence from the server (before headers, between chunks)
DEFAULT_CONNECT_TIMEOUT_S = 10.0
_MAX_HEADER_BYTES = 64 * 1024
_MAX_ERROR_BODY_BYTES = 64 * 1024
_REASON_CHARS = 300  # how much of an error body goes into the failure message

# Body framing of the response being read.
_HEAD, _CHUNKED, _LENGTH, _UNTIL_CLOSE, _TRAILER = range(5)

ApiName = Literal["completions", "chat"]


class _Sink:
    """Where one exchange's results go; the protocol calls these from ``data_received``."""

    __slots__ = ()

    def tokens(self, t: float, count: int) -> None:
        raise NotImplementedError

    def done(self, t: float, output_tokens: int | None, input_tokens: int | None, counted: int) -> None:
        raise NotImplementedError

    def failed(self, t: float, error_type: str, message: str, counted: int) -> None:
        raise NotImplementedError


class _RecordSink(_Sink):
    """Fills a ``RequestRecord``; wakes its task once, at the end.

    Arrival times are not passed through this object: the connection appends them to
    ``arrivals`` itself (a C-level ``list.append`` per read), and ``done`` turns them into
    the first-token time and the gaps.
    """

    __slots__ = ("arrivals", "fut", "rec")

    def __init__(self, rec: RequestRecord, fut: asyncio.Future[None]) -> None:
        self.rec = rec
        self.fut = fut
        self.arrivals: list[float] = []

    def tokens(self, t: float, count: int) -> None:
        self.arrivals.extend([t] * count)

    def _timings(self) -> None:
        arr = self.arrivals
        if arr:
            rec = self.rec
            rec.first_token_s = arr[0]
            # Chunks that arrived in one read get zero gaps between them.
            rec.itl_s = list(map(sub, arr[1:], arr))  # C-level loop: ~3x a comprehension

    def done(self, t: float, output_tokens: int | None, input_tokens: int | None, counted: int) -> None:
        self._timings()
        rec = self.rec
        rec.end_s = t
        if output_tokens is None:
            rec.output_tokens = counted
            rec.output_tokens_method = "counted"
        else:
            rec.output_tokens = output_tokens
            rec.output_tokens_method = "usage"
        if input_tokens is not None:
            rec.input_tokens = input_tokens
        rec.ok = True
        if not self.fut.done():
            self.fut.set_result(None)

    def failed(self, t: float, error_type: str, message: str, counted: int) -> None:
        self._timings()
        rec = self.rec
        rec.end_s = t
        rec.ok = False
        rec.error_type = error_type
        rec.error = message
        rec.output_tokens = counted
        rec.output_tokens_method = "counted"
        if not self.fut.done():
            self.fut.set_result(None)


class _EventSink(_Sink):
    """Queues ``EngineEvent``s for ``stream()``; wakes the consumer when it is waiting."""

    __slots__ = ("events", "finished", "input_tokens", "waiter")

    def __init__(self, input_tokens: int = 0) -> None:
        self.input_tokens = input_tokens  # the request's own figure, when the server gives none
        self.events: list[EngineEvent] = []
        self.waiter: asyncio.Future[None] | None = None
        self.finished = False

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def tokens(self, t: float, count: int) -> None:
        # The first content-bearing read becomes FirstToken; the consumer tells them apart.
        self.events.append(Tokens(t, count))
        self._wake()

    def done(self, t: float, output_tokens: int | None, input_tokens: int | None, counted: int) -> None:
        inp = self.input_tokens if input_tokens is None else input_tokens
        if output_tokens is None:
            self.events.append(Done(t, inp, counted, "counted"))
        else:
            self.events.append(Done(t, inp, output_tokens, "usage"))
        self.finished = True
        self._wake()

    def failed(self, t: float, error_type: str, message: str, counted: int) -> None:
        self.events.append(Failed(t, error_type, message, counted))
        self.finished = True
        self._wake()


class _BodySink(_Sink):
    """Collects a whole non-streamed body (the ``/v1/models`` check)."""

    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future[tuple[str, str]]) -> None:
        self.fut = fut

    def tokens(self, t: float, count: int) -> None:  # never called for plain bodies
        return

    def done(self, t: float, output_tokens: int | None, input_tokens: int | None, counted: int) -> None:
        raise AssertionError("plain bodies end through body_done")

    def failed(self, t: float, error_type: str, message: str, counted: int) -> None:
        if not self.fut.done():
            self.fut.set_result((error_type, message))


def _reason_from_body(body: bytes) -> str:
    """The human part of an error body: OpenAI ``error.message``, FastAPI ``detail``, or text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return text[:_REASON_CHARS]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:_REASON_CHARS]
        if isinstance(err, str):
            return err[:_REASON_CHARS]
        for key in ("message", "detail"):
            if obj.get(key):
                return str(obj[key])[:_REASON_CHARS]
    return text[:_REASON_CHARS]


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; parses the response to the request in flight."""

    def __init__(self, engine: OpenAIEngine) -> None:
        self.engine = engine
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False  # has served a request before (a stale one may fail at once)
        self.sink: _Sink | None = None
        self.last_io_s = _now()
        self._reset()

    def _reset(self) -> None:
        self.state = _HEAD
        self.head = b""
        self.status = 0
        self.reason = ""
        self.got_bytes = False
        self.keep_alive = True
        self.event_stream = True
        self.left = 0  # bytes left in the current chunk (chunked) or body (content-length)
        self.skip = 0  # CRLF bytes still to skip after a chunk's data
        self.cbuf = b""  # an incomplete chunk-size line or trailer
        self.rest = b""  # an incomplete SSE event
        self.body: list[bytes] = []  # error bodies and non-SSE bodies
        self.body_len = 0
        self.counted = 0
        self.usage_out: int | None = None
        self.usage_in: int | None = None
        self.pat_open = b""
        self.pat_empty = b""
        self.pat_usage = b'"usage":{'
        self.api_chat = False
        self.ended = False
        self.fast = False  # at a chunk boundary of an event stream, nothing carried over
        self.reasoning = False  # the response carries reasoning tokens (counted on the slow path)
        self.tail = b""  # the last read that carried content (checked for usage at the end)
        self.arrivals: list[float] | None = None  # record mode: arrival times, appended here

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.engine._active.discard(self)
        if self.sink is None or self.ended:
            return
        t = _now()
        if self.state == _UNTIL_CLOSE:
            self._body_done(t)
            return
        why = f": {exc}" if exc else ""
        if not self.got_bytes:
            self._fail(t, "connect", f"server closed the connection before responding{why}")
        else:
            self._fail(t, "protocol", f"server closed the connection mid-response{why}")

    def data_received(self, data: bytes) -> None:
        t = _now()
        self.last_io_s = t
        # Fast path, the steady state of a stream: the read is whole HTTP chunks, each holding
        # whole SSE events ("<hex>\r\n<events>\n\n\r\n"). With LF-terminated SSE lines the
        # only CRLFs are the two framing ones per chunk, so "every CRLF pair closes a chunk
        # on an event boundary" is a count check, and the chunk-size lines, hex digits, can
        # never match the content patterns. Anything else (CRLF events, a split event, the
        # last chunk) takes the general path. Usage and error events riding along with
        # content are looked for in ``tail`` when the body ends.
        if (
            self.fast
            and data.endswith(b"\n\n\r\n")
            and ((crlf := data.count(b"\r\n")) == 2 or crlf == 2 * data.count(b"\n\n\r\n"))
            # A reasoning model's first thoughts can share a read with content; only the
            # general path counts them.
            and not (self.api_chat and b'"reasoning' in data)
        ):
            count = data.count(self.pat_open)
            if count:
                count -= data.count(self.pat_empty)
                if count > 0:
                    self.tail = data
                    self.counted += count
                    arr = self.arrivals
                    if arr is None:
                        assert self.sink is not None
                        self.sink.tokens(t, count)
                    elif count == 1:
                        arr.append(t)
                    else:
                        arr.extend([t] * count)
                    return
        self._general(data, t)

    def _general(self, data: bytes, t: float) -> None:
        if self.sink is None or self.ended:
            # Bytes on an idle connection: nothing can be trusted on it any more.
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        self.got_bytes = True
        state = self.state
        if state == _CHUNKED:
            self._chunked(data, t)
        elif state == _LENGTH:
            self._length_body(data, t)
        elif state == _UNTIL_CLOSE:
            self._payload(data, t)
        elif state == _HEAD:
            self._head(data, t)
        else:  # _TRAILER
            self._trailer(data, t)
        self.fast = (
            self.state == _CHUNKED
            and not self.ended
            and self.event_stream
            and not (self.left or self.skip or self.cbuf or self.rest)
            and bool(self.pat_open)
            and not self.reasoning
        )

    # -- response head --------------------------------------------------------------------

    def _head(self, data: bytes, t: float) -> None:
        buf = self.head + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEADER_BYTES:
                self._fail(t, "protocol", "response headers too large")
            else:
                self.head = buf
            return
        self.head = b""
        lines = buf[:end].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            if not parts[0].startswith(b"HTTP/1."):
                raise ValueError(parts[0])
            status = int(parts[1])
        except (ValueError, IndexError):
            self._fail(t, "protocol", f"not an HTTP/1.x response: {lines[0][:80]!r}")
            return
        if 100 <= status < 200:  # interim response: the real one follows
            if len(buf) > end + 4:
                self._head(buf[end + 4 :], t)
            return
        self.status = status
        self.reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        length = -1
        chunked = False
        ctype = b""
        self.keep_alive = not lines[0].startswith(b"HTTP/1.0")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    self._fail(t, "protocol", "bad Content-Length")
                    return
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                v = value.strip().lower()
                if v == b"close":
                    self.keep_alive = False
                elif v == b"keep-alive":
                    self.keep_alive = True
            elif name == b"content-type":
                ctype = value.strip().lower()
        self.event_stream = status == 200 and b"event-stream" in ctype
        rest = buf[end + 4 :]
        if chunked:
            self.state = _CHUNKED
            if rest:
                self._chunked(rest, t)
        elif length >= 0:
            self.state = _LENGTH
            self.left = length
            if length == 0:
                self._body_done(t)
            elif rest:
                self._length_body(rest, t)
        else:
            self.state = _UNTIL_CLOSE
            self.keep_alive = False
            if rest:
                self._payload(rest, t)

    def _length_body(self, data: bytes, t: float) -> None:
        if len(data) > self.left:
            self._fail(t, "protocol", "server sent more bytes than its Content-Length")
            return
        self.left -= len(data)
        self._payload(data, t)
        if self.left == 0 and not self.ended:
            self._body_done(t)

    # -- chunked transfer coding ------------------------------------------------------------

    def _chunked(self, data: bytes, t: float) -> None:
        buf = self.cbuf + data if self.cbuf else data
        self.cbuf = b""
        n = len(buf)
        pos = 0
        left = self.left
        skip = self.skip
        out: list[bytes] = []
        while pos < n:
            if left:
                take = n - pos if n - pos < left else left
                out.append(buf[pos : pos + take])
                pos += take
                left -= take
                if not left:
                    skip = 2
                continue
            if skip:
                step = skip if skip < n - pos else n - pos
                pos += step
                skip -= step
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if n - pos > 1024:
                    self._fail(t, "protocol", "chunk-size line too long")
                    return
                self.cbuf = buf[pos:]
                break
            try:
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                self._fail(t, "protocol", f"bad chunk size {buf[pos:eol][:40]!r}")
                return
            pos = eol + 2
            if size == 0:
                self.left = self.skip = 0
                if out:
                    self._payload(b"".join(out), t)
                    if self.ended:
                        return
                self.state = _TRAILER
                self._trailer(buf[pos:], t)
                return
            left = size
        self.left = left
        self.skip = skip
        if out:
            self._payload(out[0] if len(out) == 1 else b"".join(out), t)

    def _trailer(self, data: bytes, t: float) -> None:
        # After the last chunk: optional trailer fields, then an empty line.
        buf = self.cbuf + data
        if buf.startswith(b"\r\n"):
            extra = buf[2:]
        else:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.cbuf = buf
                return
            extra = buf[end + 4 :]
        self.cbuf = b""
        if extra:
            self.keep_alive = False  # pipelined junk: do not reuse the connection
        self._body_done(t)

    # -- body content ---------------------------------------------------------------------

    def _payload(self, data: bytes, t: float) -> None:
        if not self.event_stream:
            self.body_len += len(data)
            if self.body_len <= _MAX_ERROR_BODY_BYTES:
                self.body.append(data)
            return
        if self.rest:
            data = self.rest + data
            self.rest = b""
        if not data.endswith(b"\n\n"):
            # Only whole events are scanned, so a pattern is never split across reads.
            cut = max(data.rfind(b"\n\n"), data.rfind(b"\n\r\n"))
            if cut < 0:
                self.rest = data
                return
            if data[cut + 1 : cut + 2] == b"\r":
                cut += 1
            self.rest = data[cut + 2 :]
            data = data[: cut + 2]
        if not self.pat_open:
            self._choose_patterns(data)
        count = data.count(self.pat_open)
        if count:
            count -= data.count(self.pat_empty)
        if self.api_chat and b'"reasoning' in data:
            # Reasoning models stream their thoughts first, as "reasoning_content" (or
            # "reasoning"); once seen, the response leaves the fast path, which counts only
            # "content".
            thoughts = self._reasoning_chunks(data)
            if thoughts:
                self.reasoning = True
                count += thoughts
        if count > 0:
            self.tail = data
            self._emit(t, count)
        if self.pat_usage in data or b'"error' in data or b"event:" in data:
            self._rare_events(data, t)

    def _emit(self, t: float, count: int) -> None:
        self.counted += count
        arr = self.arrivals
        if arr is not None:
            arr.extend([t] * count)
        else:
            assert self.sink is not None
            self.sink.tokens(t, count)

    def _choose_patterns(self, data: bytes) -> None:
        # Compact JSON (vLLM, TRT-LLM, SGLang via pydantic) writes '"key":"'; Python's json
        # module writes '"key": "'. '":"' cannot occur inside a JSON string (the quote would
        # be escaped), so its absence together with '": "' present means spaced JSON.
        spaced = b'":"' not in data and b'": "' in data
        key = b'"content":' if self.api_chat else b'"text":'
        sep = b" " if spaced else b""
        self.pat_open = key + sep + b'"'
        self.pat_empty = key + sep + b'""'
        self.pat_usage = b'"usage":' + sep + b"{"

    def _reasoning_chunks(self, data: bytes) -> int:
        n = 0
        for key in (b'"reasoning_content":', b'"reasoning":'):
            for sep in (b"", b" "):
                n += data.count(key + sep + b'"') - data.count(key + sep + b'""')
        return n

    def _rare_events(self, data: bytes, t: float) -> bool:
        """Usage, error and named events: decoded in full. True when the exchange ended."""
        for event in data.replace(b"\r\n", b"\n").split(b"\n\n"):
            if not event:
                continue
            name = b""
            payload = b""
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                elif line.startswith(b"event:"):
                    name = line[6:].strip()
            if not payload or payload == b"[DONE]":
                continue
            if name == b"error" or b'"error' in payload:
                try:
                    obj = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    obj = None
                msg = self._error_message(obj, payload, name == b"error")
                if msg is not None:
                    self._fail(t, "protocol", f"server error event: {msg}")
                    return True
            if b'"usage":' in payload:
                try:
                    obj = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue
                usage = obj.get("usage") if isinstance(obj, dict) else None
                if isinstance(usage, dict):
                    out = usage.get("completion_tokens")
                    if isinstance(out, int):
                        self.usage_out = out
                    inp = usage.get("prompt_tokens")
                    if isinstance(inp, int):
                        self.usage_in = inp
        return False

    @staticmethod
    def _error_message(obj: object, payload: bytes, named: bool) -> str | None:
        if isinstance(obj, dict):
            err = obj.get("error")
            if isinstance(err, dict):
                return str(err.get("message") or err)[:_REASON_CHARS]
            if isinstance(err, str):
                return err[:_REASON_CHARS]
            if obj.get("object") == "error":
                return str(obj.get("message") or obj)[:_REASON_CHARS]
            for choice in obj.get("choices") or ():
                if isinstance(choice, dict) and choice.get("finish_reason") == "error":
                    return "a choice finished with reason 'error'"
            return payload.decode("utf-8", "replace")[:_REASON_CHARS] if named else None
        return payload.decode("utf-8", "replace")[:_REASON_CHARS] if named else None

    # -- ends -----------------------------------------------------------------------------

    def _body_done(self, t: float) -> None:
        sink = self.sink
        assert sink is not None
        self.ended = True
        self.fast = False
        self.engine._active.discard(self)
        status = self.status
        if status != 200:
            body = b"".join(self.body)
            reason = _reason_from_body(body) if body else ""
            kind = "http_4xx" if 400 <= status < 500 else "http_5xx" if status >= 500 else "protocol"
            msg = f"HTTP {status} {self.reason}".rstrip() + (f": {reason}" if reason else "")
            if isinstance(sink, _BodySink):
                sink.failed(t, kind, msg, 0)
            else:
                self.engine._count_error(kind)
                sink.failed(t, kind, msg, self.counted)
        elif isinstance(sink, _BodySink):
            if not sink.fut.done():
                sink.fut.set_result(("", b"".join(self.body).decode("utf-8", "replace")))
        elif not self.event_stream:
            self._plain_json_done(sink, t)
        elif (self.rest.strip() and self._tail_event(t)) or self._tail_rare(t):
            return
        else:
            sink.done(t, self.usage_out, self.usage_in, self.counted)
        self._release()

    def _tail_rare(self, t: float) -> bool:
        """Usage or error events that came in a content read on the fast path. True if failed."""
        tail = self.tail
        if self.usage_out is None and tail and (self.pat_usage in tail or b'"error' in tail):
            self.tail = b""
            self.ended = False
            failed = self._rare_events(tail, t)
            self.ended = True
            return failed
        return False

    def _tail_event(self, t: float) -> bool:
        """A last event without its blank line; True when it ended the exchange."""
        data = self.rest + b"\n\n"
        self.rest = b""
        self.ended = False
        self._payload(data, t)
        if self.ended:  # an error event failed it
            return True
        self.ended = True
        assert self.sink is not None
        self.sink.done(t, self.usage_out, self.usage_in, self.counted)
        self._release()
        return True

    def _plain_json_done(self, sink: _Sink, t: float) -> None:
        # The server ignored stream=true and answered with one JSON body.
        try:
            obj = orjson.loads(b"".join(self.body))
        except orjson.JSONDecodeError:
            self.engine._count_error("protocol")
            sink.failed(t, "protocol", "200 response is neither an event stream nor JSON", 0)
            return
        usage = obj.get("usage") if isinstance(obj, dict) else None
        out = usage.get("completion_tokens") if isinstance(usage, dict) else None
        inp = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        counted = 1 if isinstance(obj, dict) and obj.get("choices") else 0
        if counted or isinstance(out, int):
            self._emit(t, 1)
        sink.done(t, out if isinstance(out, int) else None, inp if isinstance(inp, int) else None, counted)

    def _fail(self, t: float, error_type: str, message: str) -> None:
        self.ended = True
        self.fast = False
        self.engine._active.discard(self)
        self.engine._count_error(error_type)
        sink = self.sink
        self.sink = None
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if sink is not None:
            sink.failed(t, error_type, message, self.counted)

    def _release(self) -> None:
        self.sink = None
        if self.keep_alive and not self.closed:
            self.reused = True
            self.engine._idle.append(self)
        else:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self, error_type: str, message: str) -> None:
        """Fail the exchange in flight (timeout, stop, consumer gone) and drop the connection."""
        if self.sink is not None and not self.ended:
            self._fail(_now(), error_type, message)
        else:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def send(self, payload: bytes, sink: _Sink, api_chat: bool) -> None:
        self._reset()
        self.api_chat = api_chat
        self.sink = sink
        if isinstance(sink, _RecordSink):
            self.arrivals = sink.arrivals
        self.last_io_s = _now()
        self.engine._active.add(self)
        assert self.transport is not None
        self.transport.write(payload)


class OpenAIEngine:
    """Streams requests to an OpenAI-compatible server; see the module docstring.

    ``base_url`` is the server root, with or without the ``/v1`` suffix
    (``http://127.0.0.1:8000`` and ``http://127.0.0.1:8000/v1`` mean the same). An empty
    ``model`` means "the first model the server lists", filled in by ``start()``.
    ``timeout_s`` is the longest the server may stay silent (waiting for the response head
    or between chunks), not a cap on a whole generation.
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
    ) -> None:
        if api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', not {api!r}")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL, not {base_url!r}")
        self.base_url = base_url
        self.model = model
        self.api: ApiName = api
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
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
        self._idle: list[_Conn] = []
        self._active: set[_Conn] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self.error_counts: Counter[str] = Counter()
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
        conn.send(self._get_models, _BodySink(fut), api_chat=False)
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
        for conn in list(self._active):
            conn.abort("cancelled", "engine stopped")
        for conn in self._idle:
            conn.abort("cancelled", "engine stopped")
        self._idle.clear()
        self._active.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks

    async def prewarm(self, connections: int) -> int:
        """Open keep-alive connections ahead of a burst, so no request pays for a connect.

        Returns how many idle connections the pool holds afterwards.
        """
        need = connections - sum(1 for c in self._idle if not c.closed)
        if need > 0:
            conns = await asyncio.gather(*(self._connect() for _ in range(need)), return_exceptions=True)
            for c in conns:
                if isinstance(c, _Conn):
                    self._idle.append(c)
                elif isinstance(c, BaseException) and not isinstance(c, Exception):
                    raise c
        return sum(1 for c in self._idle if not c.closed)

    async def stream(self, request: Request) -> AsyncIterator[EngineEvent]:
        """Stream one request; yields FirstToken, Tokens..., then Done or Failed."""
        sink = _EventSink(request.input_tokens)
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
                    sink = _EventSink(request.input_tokens)
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

    async def record(self, request: Request) -> RequestRecord:
        """Run one request into a ``RequestRecord`` (the lean path the load generator uses)."""
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
            sink = _RecordSink(rec, fut)
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

    def _stale_failure(self, conn: _Conn, ev: EngineEvent) -> bool:
        if isinstance(ev, Failed) and ev.error_type == "connect" and conn.reused and not conn.got_bytes:
            self.error_counts["connect"] -= 1
            return True
        return False

    def _count_error(self, error_type: str) -> None:
        self.error_counts[error_type] += 1

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

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            _, proto = await loop.create_connection(
                lambda: _Conn(self),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
            )
        return proto

    async def _acquire(self, fresh: bool) -> _Conn:
        idle = self._idle
        while idle and not fresh:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return await self._connect()

    async def _begin(self, request: Request, sink: _Sink, fresh: bool = False) -> _Conn | None:
        """Send the request on a pooled connection; None when it failed before sending."""
        body = self._body_bytes(request)
        if body is None:
            what = "a text prompt" if self._chat else "a prompt or input_ids"
            self._count_error("engine")
            sink.failed(_now(), "engine", f"request {request.request_id} has no {what} for the {self.api} API", 0)
            return None
        try:
            conn = await self._acquire(fresh)
        except TimeoutError:
            self._count_error("timeout")
            msg = f"connect to {self._host}:{self._port} took over {self.connect_timeout_s:g} s"
            sink.failed(_now(), "timeout", msg, 0)
            return None
        except (OSError, ssl_module.SSLError) as exc:
            self._count_error("connect")
            sink.failed(_now(), "connect", f"cannot connect to {self._host}:{self._port}: {exc}", 0)
            return None
        rid = request.request_id
        extra_head = b"Content-Length: %d\r\n" % len(body)
        if rid.isprintable() and len(rid) < 256:
            extra_head += b"X-Request-Id: " + rid.encode("utf-8", "replace") + b"\r\n"
        conn.send(self._post_head + extra_head + b"\r\n" + body, sink, self._chat)
        self._ensure_watchdog()
        return conn

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None:
            interval_s = min(1.0, self.timeout_s / 4)
            self._watchdog = asyncio.get_running_loop().call_later(interval_s, self._watch, interval_s)

    def _watch(self, interval_s: float) -> None:
        # One timer for the whole engine instead of one per read: re-arming a timer on every
        # chunk would cost more than parsing it.
        deadline = _now() - self.timeout_s
        for conn in [c for c in self._active if c.last_io_s < deadline]:
            conn.abort("timeout", f"server silent for over {self.timeout_s:g} s")
        self._watchdog = asyncio.get_running_loop().call_later(interval_s, self._watch, interval_s)


def is_available() -> bool:
    """The engine needs nothing beyond the core dependencies; reachability is ``start()``'s job."""
    return True


__all__ = ["DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_TIMEOUT_S", "OpenAIEngine", "is_available"]
