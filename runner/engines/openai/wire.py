"""One keep-alive HTTP/1.1 connection: the request out, the response parsed as its bytes arrive.

A raw ``asyncio.Protocol`` (no StreamReader, no line iteration). The arrival time is taken
first thing in ``data_received``; chunked transfer decoding works on ``bytes``; the event
stream inside goes to ``sse.EventDecoder``. A fast path takes the steady state of a stream,
reads of whole chunks of one-line content events, which ``fastpath.ContentShape`` vouches
for, so it never counts what the general path would refuse. Every malformed byte fails the
exchange with ``protocol``; what a peer can make the client buffer is capped (headers,
trailers, chunk-size lines, one event, a plain body).
"""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from collections import Counter
from typing import cast

import orjson

from rackscope.runner.engines.openai.fastpath import NEEDS_ESCAPE, utf8
from rackscope.runner.engines.openai.sinks import BodySink, RecordSink, Sink
from rackscope.runner.engines.openai.sse import EventDecoder, MalformedStream, ServerErrorEvent, reason_from_body

_now = time.perf_counter
_loads = orjson.loads

_MAX_HEADER_BYTES = 64 * 1024  # the response head, and the trailer after the last chunk
_MAX_CHUNK_LINE_BYTES = 1024  # a chunk-size line with its extensions
_MAX_BODY_BYTES = 1024 * 1024  # a body that is not an event stream (errors, the model list)
_MAX_KEPT_BODY_BYTES = 64 * 1024  # of an error body: enough for its reason

# Body framing of the response being read.
_HEAD, _CHUNKED, _LENGTH, _UNTIL_CLOSE, _TRAILER = range(5)


def _error_kind(status: int) -> str:
    return "http_4xx" if 400 <= status < 500 else "http_5xx" if status >= 500 else "protocol"


class Pool:
    """What the connections of one engine share: idle ones for reuse, the ones with a request
    in flight (which the engine's watchdog checks), and failures by type."""

    __slots__ = ("active", "error_counts", "idle")

    def __init__(self) -> None:
        self.idle: list[Conn] = []
        self.active: set[Conn] = set()
        self.error_counts: Counter[str] = Counter()


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; parses the response to the request in flight."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False  # has served a request before (a stale one may fail at once)
        self.sink: Sink | None = None
        self.last_io_s = _now()
        self.deadline_s = math.inf  # when the exchange in flight must have ended
        self._reset(False)

    def _reset(self, api_chat: bool) -> None:
        self.state = _HEAD
        self.head = b""
        self.status = 0
        self.reason = ""
        self.got_bytes = False
        self.keep_alive = True
        self.event_stream = True
        self.left = 0  # bytes left in the current chunk (chunked) or body (content-length)
        self.skip = 0  # bytes of the CRLF after a chunk's data still to come
        self.cbuf = b""  # an incomplete chunk-size line or trailer
        self.body: list[bytes] = []  # error bodies and non-SSE bodies
        self.body_len = 0
        self.counted = 0  # content chunks counted (stream mode; in record mode: len(arrivals))
        self.api_chat = api_chat
        self.sse = EventDecoder(api_chat)
        self.shape = self.sse.shape  # for the fast path, one attribute away
        self.ended = False
        self.fast = False  # at a chunk boundary of an event stream, nothing carried over
        self.arrivals: array[float] | None = None  # record mode: arrival times, appended here

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.active.discard(self)
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
        # The arrival time first: nothing the client does with the bytes counts against them.
        t = _now()
        self.last_io_s = t
        # Fast path, the steady state of a stream: the read is whole HTTP chunks of one-line
        # content events, which ``ContentShape`` vouches for (see ``fastpath``). Anything else
        # (usage, errors, reasoning, the last chunk, a split event) takes the general path.
        if self.fast:
            # The usual read, one chunk holding one event of the response's shape, checked
            # inline (a Python call costs as much as the checks): its size line, "data: " and
            # the shape's head in one startswith, the shape's tail and the chunk's end in one
            # endswith, and a content string that needs no escape and is valid UTF-8.
            shape = self.shape
            n = len(data)
            prefix = shape.prefixes.get(n)
            if prefix is not None and data.startswith(prefix) and data.endswith(shape.shape_end):
                body = data[len(prefix) : n - shape.end_len]
                if body and body.translate(None, NEEDS_ESCAPE) == body and (body.isascii() or utf8(body)):
                    arr = self.arrivals
                    if arr is not None:
                        arr.append(t)
                    else:
                        self._emit(t, 1)
                    return
            if data.endswith(b"\n\n\r\n"):
                count = shape.count_read(data)
                if count > 0:
                    arr = self.arrivals
                    if arr is None:
                        self._emit(t, count)
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
        sse = self.sse
        self.fast = (
            self.state == _CHUNKED
            and not self.ended
            and self.event_stream
            and not (self.left or self.skip or self.cbuf or sse.pending)
            and bool(self.shape.pat_open)
            and not sse.reasoning
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
        encoding = b""
        self.keep_alive = not lines[0].startswith(b"HTTP/1.0")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -2
                if length < 0:
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
                ctype = value.partition(b";")[0].strip().lower()
            elif name == b"content-encoding":
                encoding = value.strip().lower()
        if encoding not in (b"", b"identity"):
            # Never asked for: the patterns and the JSON would be read on compressed bytes.
            self._fail(t, "protocol", f"unrequested Content-Encoding {encoding[:40].decode('latin-1')!r}")
            return
        self.event_stream = status == 200 and ctype == b"text/event-stream"
        # A server that ignored stream=true may answer with one JSON body; anything else is not
        # an answer to a streaming request.
        json_body = ctype == b"application/json" or ctype.endswith(b"+json")
        if status == 200 and not (self.event_stream or json_body or isinstance(self.sink, BodySink)):
            shown = ctype[:60].decode("latin-1") or "none"
            self._fail(t, "protocol", f"200 response is not an event stream (Content-Type: {shown})", malformed=True)
            return
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
            self._fail(t, "protocol", "server sent more bytes than its Content-Length", malformed=True)
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
                if buf[pos : pos + step] != b"\r\n"[2 - skip : 2 - skip + step]:
                    self._fail(t, "protocol", "chunk data not followed by CRLF (wrong chunk size?)", malformed=True)
                    return
                pos += step
                skip -= step
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if n - pos > _MAX_CHUNK_LINE_BYTES:
                    self._fail(t, "protocol", "chunk-size line too long", malformed=True)
                    return
                self.cbuf = buf[pos:]
                break
            try:
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                size = -1
            if size < 0:
                self._fail(t, "protocol", f"bad chunk size {buf[pos:eol][:40]!r}", malformed=True)
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
                if len(buf) > _MAX_HEADER_BYTES:
                    self._fail(t, "protocol", "trailer too large")
                else:
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
            if self.body_len > _MAX_BODY_BYTES:
                what = f"HTTP {self.status} body" if self.status != 200 else "response body"
                self._fail(t, _error_kind(self.status), f"{what} longer than {_MAX_BODY_BYTES} bytes", malformed=True)
            elif self.status == 200 or self.body_len <= _MAX_KEPT_BODY_BYTES:
                self.body.append(data)
            return
        try:
            count = self.sse.feed(data)
        except MalformedStream as exc:
            self._fail(t, "protocol", str(exc), malformed=True)
            return
        except ServerErrorEvent as exc:
            if exc.counted > 0:
                self._emit(t, exc.counted)
            self._fail(t, "protocol", f"server error event: {exc}")
            return
        if count > 0:
            self._emit(t, count)

    def _emit(self, t: float, count: int) -> None:
        arr = self.arrivals
        if arr is not None:
            arr.extend([t] * count)
        else:
            self.counted += count
            assert self.sink is not None
            self.sink.tokens(t, count)

    def tokens_counted(self) -> int:
        """Content chunks counted so far in the exchange in flight."""
        arr = self.arrivals
        return len(arr) if arr is not None else self.counted

    # -- ends -----------------------------------------------------------------------------

    def _body_done(self, t: float) -> None:
        sink = self.sink
        assert sink is not None
        status = self.status
        if status != 200:
            body = b"".join(self.body)
            reason = reason_from_body(body) if body else ""
            msg = f"HTTP {status} {self.reason}".rstrip() + (f": {reason}" if reason else "")
            self._fail(t, _error_kind(status), msg, keep=True)
            return
        if isinstance(sink, BodySink):
            self._end()
            self._release()
            sink.body(b"".join(self.body).decode("utf-8", "replace"))
        elif not self.event_stream:
            self._plain_json_done(sink, t)
        else:
            self._stream_done(sink, t)

    def _end(self) -> None:
        self.ended = True
        self.fast = False
        self.pool.active.discard(self)

    def _stream_done(self, sink: Sink, t: float) -> None:
        try:
            count = self.sse.finish()
        except MalformedStream as exc:
            self._fail(t, "protocol", str(exc), malformed=True)
            return
        except ServerErrorEvent as exc:
            self._fail(t, "protocol", f"server error event: {exc}")
            return
        if count > 0:
            self._emit(t, count)
        self._end()
        sink.done(t, self.sse.usage_out, self.sse.usage_in, self.tokens_counted())
        self._release()

    def _plain_json_done(self, sink: Sink, t: float) -> None:
        # The server ignored stream=true and answered with one JSON body.
        try:
            obj = _loads(b"".join(self.body))
        except orjson.JSONDecodeError:
            self._fail(t, "protocol", "200 response is neither an event stream nor JSON", malformed=True)
            return
        usage = obj.get("usage") if isinstance(obj, dict) else None
        out = usage.get("completion_tokens") if isinstance(usage, dict) else None
        inp = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        counted = 1 if isinstance(obj, dict) and obj.get("choices") else 0
        if not (counted or isinstance(out, int)):
            self._fail(t, "protocol", "200 JSON response has neither choices nor usage", malformed=True)
            return
        self._emit(t, 1)
        self._end()
        sink.done(t, out if isinstance(out, int) else None, inp if isinstance(inp, int) else None, counted)
        self._release()

    def _fail(self, t: float, error_type: str, message: str, malformed: bool = False, keep: bool = False) -> None:
        """End the exchange as failed. ``malformed``: what arrived cannot be trusted, so none of
        its tokens count. ``keep``: the response was read to its end and the connection may serve
        another request."""
        self._end()
        sink = self.sink
        if sink is not None and not isinstance(sink, BodySink):  # the model-list check is no request
            self.pool.error_counts[error_type] += 1
        if malformed:
            self.counted = 0
            if self.arrivals:
                del self.arrivals[:]
        if keep:
            self._release()
        else:
            self.sink = None
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        if sink is not None:
            sink.failed(t, error_type, message, self.tokens_counted())

    def _release(self) -> None:
        self.sink = None
        if self.keep_alive and not self.closed:
            self.reused = True
            self.pool.idle.append(self)
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

    def send(self, payload: bytes, sink: Sink, api_chat: bool, deadline_s: float) -> None:
        """Write a request; its response goes to ``sink``. ``deadline_s``: when, on the
        ``perf_counter`` clock, the whole exchange must have ended (the engine's watchdog checks)."""
        self._reset(api_chat)
        self.sink = sink
        if isinstance(sink, RecordSink):
            self.arrivals = sink.arrivals
        self.deadline_s = deadline_s
        self.pool.active.add(self)
        assert self.transport is not None
        # The request starts where its bytes go out: taken here, not where its task was
        # scheduled, so a burst of requests does not charge the later ones for the earlier ones'
        # sending. The write itself (a send on the socket, on uvloop) counts as part of it.
        t = _now()
        self.last_io_s = t
        sink.sent(t)
        self.transport.write(payload)
