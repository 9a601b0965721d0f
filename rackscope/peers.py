"""Bounded reads from peers: a whole-operation deadline, a size cap after decompression, a stop flag.

Every outbound HTTP read rackscope makes (dcgm-exporter, an inference server's metrics page,
another agent) goes through here. A peer may be broken or hostile: it can announce a large
Content-Length and trickle a byte a second, send a gzip body that inflates a thousandfold, lie
about its length and fall silent, or never answer at all. A per-read socket timeout bounds none
of that, so each request here is bounded three ways: the whole operation (name lookup, connect,
TLS, request, answer) has one deadline, the decoded body has a size cap, and a caller-owned
``threading.Event`` aborts a request in progress, so shutdown never waits on a peer.

The HTTP/1.1 client is written on a non-blocking socket rather than on ``http.client``: every
wait is a ``select`` of at most ``READ_SLICE_S``, after which the deadline and the stop flag are
looked at again. (``http.client`` reads through a buffered socket file that cannot survive a
timeout: once one slice passes without data, the next read fails, so a peer that merely pauses
mid-answer would be cut off, and a partial status line would be lost.)
"""

from __future__ import annotations

import errno
import ipaddress
import os
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rackscope.errors import PeerError

if TYPE_CHECKING:
    import aiohttp

MIB = 1024 * 1024
# No wait on a peer is longer than this, so a deadline or a stop request is seen within it.
READ_SLICE_S = 0.1
# What one recv may return; also the decompression step, so a bomb is cut within one step.
CHUNK_BYTES = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # status line, headers and (chunked) trailers together
MAX_HEADERS = 100
MAX_CHUNK_LINE_BYTES = 1024  # a chunk-size line with its extensions

_NO_BODY_STATUSES = frozenset({204, 304})


class Deadline:
    """A point in monotonic time; ``remaining()`` is what is left of it, never negative."""

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"a deadline must be positive, not {seconds}")
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._end


class Inflater:
    """Decodes a Content-Encoding incrementally and refuses to produce more than ``max_bytes``."""

    def __init__(self, encoding: str | None, max_bytes: int, what: str) -> None:
        encoding = (encoding or "identity").strip().lower()
        self._gzip = encoding in ("gzip", "x-gzip")
        if encoding in ("identity", ""):
            self._z: Any = None
        elif self._gzip:
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._z = zlib.decompressobj()
        else:
            raise PeerError(f"{what}: unsupported Content-Encoding {encoding!r}")
        self._max = max_bytes
        self._what = what
        self._out = bytearray()

    def feed(self, data: bytes) -> None:
        if self._z is None:
            self._append(data)
            return
        try:
            pending = data
            while pending:
                if self._z.eof:
                    if not self._gzip:
                        raise PeerError(f"{self._what}: data after the end of the compressed body")
                    # Concatenated gzip members decode to the concatenation (RFC 1952).
                    self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                # Inflate at most what is still allowed (+1 to notice overflow), a step at a time.
                room = self._max - len(self._out) + 1
                self._append(self._z.decompress(pending, room))
                pending = self._z.unconsumed_tail or (self._z.unused_data if self._z.eof else b"")
        except zlib.error as exc:
            raise PeerError(f"{self._what}: corrupt compressed body: {exc}") from exc

    def finish(self) -> bytes:
        if self._z is not None and not self._z.eof:
            raise PeerError(f"{self._what}: truncated compressed body")
        return bytes(self._out)

    def _append(self, data: bytes) -> None:
        self._out += data
        if len(self._out) > self._max:
            raise PeerError(f"{self._what}: sent more than {_size(self._max)} (decoded)")


def inflate(body: bytes, encoding: str | None, max_bytes: int, what: str = "the peer") -> bytes:
    """Decode a whole body, never producing more than ``max_bytes``."""
    inflater = Inflater(encoding, max_bytes, what)
    inflater.feed(body)
    return inflater.finish()


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""


@dataclass(frozen=True)
class Target:
    """A parsed http(s) URL; ``what`` names it in errors without its userinfo or query."""

    https: bool
    host: str
    port: int
    path: str  # path and query
    what: str

    @classmethod
    def parse(cls, url: str, default_path: str = "/") -> Target:
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        https = parts.scheme == "https"
        path = parts.path or default_path
        if parts.query:
            path = f"{path}?{parts.query}"
        if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in path):
            raise ValueError(f"a URL path must not hold spaces or control characters: {url!r}")
        netloc = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        if port is not None:
            netloc = f"{netloc}:{port}"
        return cls(
            https=https,
            host=parts.hostname,
            port=port or (443 if https else 80),
            path=path,
            what=f"{parts.scheme}://{netloc}{parts.path or default_path}",
        )

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.https else 80) else f"{host}:{self.port}"


def fetch(
    target: Target,
    *,
    deadline_s: float,
    max_bytes: int,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    stop: threading.Event | None = None,
) -> Response:
    """One HTTP/1.1 request on a fresh connection, bounded in time, size and by ``stop``.

    Any status is returned (the caller decides what a 500 means). Raises ``PeerError`` for
    every failure: unreachable, too slow as a whole, too large after decoding, malformed, or
    stopped. A fresh connection per call keeps no state a hostile peer could poison; at one
    request a second its cost is noise."""
    request = _request(target, method, body, headers)  # a caller's mistake fails before any connection
    conn = _Connection(target, Deadline(deadline_s), stop)
    try:
        conn.open()
        conn.send(request)
        reader = _Reader(conn)
        status, reason, header_map = _read_head(reader, target.what)
        conn.phase = "body"
        data = b""
        if method != "HEAD" and status not in _NO_BODY_STATUSES:
            inflater = Inflater(header_map.get("content-encoding"), max_bytes, target.what)
            _read_body(reader, header_map, max_bytes, inflater.feed, target.what)
            data = inflater.finish()
    finally:
        conn.close()
    return Response(status=status, reason=reason, headers=header_map, body=data)


def _request(target: Target, method: str, body: bytes | None, headers: dict[str, str] | None) -> bytes:
    if not method.isascii() or not method.isalpha():
        raise ValueError(f"bad request method {method!r}")
    fields = {"host": ("Host", target.host_header), "user-agent": ("User-Agent", "rackscope")}
    fields["accept-encoding"] = ("Accept-Encoding", "gzip")
    for name, value in (headers or {}).items():
        if any(c in name + value for c in "\r\n\0") or not name or ":" in name:
            raise ValueError(f"bad request header {name!r}")
        fields[name.lower()] = (name, value)
    fields["connection"] = ("Connection", "close")  # one request per connection, always
    if body is not None:
        fields["content-length"] = ("Content-Length", str(len(body)))
    head = f"{method} {target.path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields.values()) + "\r\n"
    return head.encode("latin-1") + (body or b"")


class _Connection:
    """One non-blocking socket to a peer; every wait is sliced so the deadline and the stop flag
    are seen within ``READ_SLICE_S``."""

    def __init__(self, target: Target, deadline: Deadline, stop: threading.Event | None) -> None:
        self.target = target
        self.deadline = deadline
        self.stop = stop
        self.phase = "connect"  # then "answer" (waiting for the status line), then "body"
        self.received = 0
        self._sock: socket.socket | None = None
        self._selector = selectors.DefaultSelector()

    def check(self) -> None:
        what = self.target.what
        if self.stop is not None and self.stop.is_set():
            raise PeerError(f"{what}: stopped while {self._doing()}")
        if self.deadline.expired:
            seconds = self.deadline.seconds
            if self.phase == "connect":
                raise PeerError(f"{what}: could not connect within {seconds:g} s")
            if self.phase == "answer" and not self.received:
                raise PeerError(f"{what}: did not answer within {seconds:g} s")
            raise PeerError(f"{what}: did not finish answering within {seconds:g} s ({self.received} bytes)")

    def _doing(self) -> str:
        return {"connect": "connecting", "answer": "waiting for an answer"}.get(self.phase, "reading the answer")

    def _wait(self, sock: socket.socket, events: int) -> None:
        key = self._selector.get_map().get(sock)
        if key is None:
            self._selector.register(sock, events)
        elif key.events != events:
            self._selector.modify(sock, events)
        self._selector.select(min(READ_SLICE_S, self.deadline.remaining()))

    def open(self) -> None:
        what = self.target.what
        addresses = _resolve(self.target.host, self.target.port, self)
        failures = []
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                error = sock.connect_ex(address)
                while error in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EINTR):
                    self.check()
                    self._wait(sock, selectors.EVENT_WRITE)
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error == 0 and not _connected(sock):
                        error = errno.EINPROGRESS
                if error:
                    failures.append(f"{os.strerror(error)} ({address[0]})")
                    self._forget(sock)
                    continue
            except BaseException:
                self._forget(sock)
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            break
        if self._sock is None:
            raise PeerError(f"{what}: cannot connect: {', '.join(failures) or 'no address'}")
        if self.target.https:
            self._handshake()
        self.phase = "answer"

    def _forget(self, sock: socket.socket) -> None:
        if sock in self._selector.get_map():
            self._selector.unregister(sock)
        sock.close()

    def _handshake(self) -> None:
        assert self._sock is not None
        plain = self._sock
        if plain in self._selector.get_map():
            self._selector.unregister(plain)
        context = ssl.create_default_context()
        tls = context.wrap_socket(plain, server_hostname=self.target.host, do_handshake_on_connect=False)
        self._sock = tls
        while True:
            self.check()
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                self._wait(tls, selectors.EVENT_READ)
            except ssl.SSLWantWriteError:
                self._wait(tls, selectors.EVENT_WRITE)
            except (ssl.SSLError, OSError) as exc:
                raise PeerError(f"{self.target.what}: TLS handshake failed: {exc}") from exc

    def send(self, data: bytes) -> None:
        assert self._sock is not None
        view = memoryview(data)
        while view:
            self.check()
            try:
                view = view[self._sock.send(view) :]
            except (BlockingIOError, ssl.SSLWantWriteError):
                self._wait(self._sock, selectors.EVENT_WRITE)
            except ssl.SSLWantReadError:
                self._wait(self._sock, selectors.EVENT_READ)
            except OSError as exc:
                raise PeerError(f"{self.target.what}: cannot send the request: {exc}") from exc

    def recv(self) -> bytes:
        """Up to ``CHUNK_BYTES``; ``b""`` once the peer has closed its side."""
        assert self._sock is not None
        while True:
            self.check()
            try:
                data = self._sock.recv(CHUNK_BYTES)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._wait(self._sock, selectors.EVENT_READ)
                continue
            except ssl.SSLWantWriteError:
                self._wait(self._sock, selectors.EVENT_WRITE)
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except OSError as exc:
                raise PeerError(f"{self.target.what}: connection lost: {exc}") from exc
            self.received += len(data)
            return data

    def close(self) -> None:
        self._selector.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


AddrInfo = tuple[Any, Any, int, str, Any]


def _resolve(host: str, port: int, conn: _Connection) -> list[AddrInfo]:
    """``getaddrinfo`` within the deadline. A numeric address needs no lookup; a name is looked up
    on a daemon thread, because a resolver can block for longer than any deadline and cannot
    be interrupted (a lookup that hangs leaves that thread behind, not the caller)."""
    what = conn.target.what
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    result: list[list[AddrInfo] | BaseException] = []

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=lookup, name="peer-lookup", daemon=True)
    thread.start()
    while thread.is_alive():
        conn.check()
        thread.join(min(READ_SLICE_S, conn.deadline.remaining()))
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise PeerError(f"{what}: cannot resolve {host}: {outcome}") from outcome
    return outcome


class _Reader:
    """Buffered reads over a ``_Connection``: lines for the head and chunk sizes, counted bytes
    for bodies."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.buf = bytearray()
        self.eof = False
        self.line_bytes = 0  # consumed through line(), for the head's size budget

    def _fill(self) -> bool:
        if self.eof:
            return False
        data = self.conn.recv()
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def line(self, limit: int, where: str, cap: int | None = None) -> bytes:
        """One line without its CRLF (or bare LF); refused when it would take more than ``limit``
        bytes (``cap`` is the limit named in the error, when ``limit`` is what is left of it)."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0 and end < limit:
                text = bytes(self.buf[:end])
                del self.buf[: end + 1]
                self.line_bytes += end + 1
                return text[:-1] if text.endswith(b"\r") else text
            if end >= 0 or len(self.buf) >= limit:
                raise PeerError(f"{self.conn.target.what}: {where} is longer than {_size(cap or limit)}")
            if not self._fill():
                if not self.buf and not self.conn.received:
                    raise PeerError(f"{self.conn.target.what}: closed the connection without answering")
                raise PeerError(f"{self.conn.target.what}: closed the connection in the middle of {where}")

    def exactly(self, count: int, sink: Callable[[bytes], None]) -> None:
        left = count
        while left:
            if not self.buf and not self._fill():
                raise PeerError(f"{self.conn.target.what}: closed the connection after {count - left} of {count} bytes")
            piece = bytes(self.buf[:left])
            del self.buf[: len(piece)]
            left -= len(piece)
            sink(piece)

    def rest(self, sink: Callable[[bytes], None]) -> None:
        while self.buf or self._fill():
            piece = bytes(self.buf)
            self.buf.clear()
            sink(piece)


def _read_head(reader: _Reader, what: str) -> tuple[int, str, dict[str, str]]:
    start = reader.line_bytes  # interim answers count against the one head budget
    while True:
        status_line = reader.line(MAX_HEAD_BYTES - (reader.line_bytes - start), "the response head", MAX_HEAD_BYTES)
        version, _, rest = status_line.decode("latin-1").partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise PeerError(f"{what}: not an HTTP/1.x answer: {status_line[:80]!r}")
        headers = _read_fields(reader, start, what, "the response head")
        status = int(code)
        if 100 <= status < 200:
            continue  # interim answers (100 Continue, 103 Early Hints) precede the real one
        return status, reason.strip(), headers


def _read_fields(reader: _Reader, start: int, what: str, where: str) -> dict[str, str]:
    """Header (or trailer) lines up to the empty line; all lines read since ``start`` together
    stay within ``MAX_HEAD_BYTES``."""
    headers: dict[str, str] = {}
    for count in range(MAX_HEADERS + 1):
        raw = reader.line(MAX_HEAD_BYTES - (reader.line_bytes - start), where, MAX_HEAD_BYTES)
        if not raw:
            return headers
        if count == MAX_HEADERS:
            break
        text = raw.decode("latin-1")
        name, colon, value = text.partition(":")
        if not colon or not name or name != name.strip() or " " in name or text[0] in " \t":
            raise PeerError(f"{what}: malformed header line {text[:80]!r}")
        key, value = name.lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    raise PeerError(f"{what}: more than {MAX_HEADERS} header lines")


def _read_body(
    reader: _Reader, headers: dict[str, str], max_bytes: int, sink: Callable[[bytes], None], what: str
) -> None:
    # Compressed bytes are capped too (a little above the decoded cap, for incompressible data).
    raw_cap = max_bytes + CHUNK_BYTES
    raw = 0

    def counted(piece: bytes) -> None:
        nonlocal raw
        raw += len(piece)
        if raw > raw_cap:
            raise PeerError(f"{what}: sent more than {_size(max_bytes)}")
        sink(piece)

    codings = [c.strip().lower() for c in headers.get("transfer-encoding", "").split(",") if c.strip()]
    if codings:
        if codings != ["chunked"]:
            raise PeerError(f"{what}: unsupported Transfer-Encoding {headers['transfer-encoding']!r}")
        _read_chunked(reader, counted, what)
        return
    length_text = headers.get("content-length")
    if length_text is None:
        reader.rest(counted)  # delimited by the peer closing the connection
        return
    values = {v.strip() for v in length_text.split(",")}
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise PeerError(f"{what}: malformed Content-Length {length_text[:40]!r}")
    length = int(next(iter(values)))
    if length > raw_cap:
        raise PeerError(f"{what}: announced {_size(length)}, more than {_size(max_bytes)}")
    reader.exactly(length, counted)


def _read_chunked(reader: _Reader, sink: Callable[[bytes], None], what: str) -> None:
    while True:
        line = reader.line(MAX_CHUNK_LINE_BYTES, "a chunk size")
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise PeerError(f"{what}: malformed chunk size {line[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            _read_fields(reader, reader.line_bytes, what, "the trailers")
            return
        reader.exactly(size, sink)
        if reader.line(2, "a chunk"):
            raise PeerError(f"{what}: a chunk longer than its size")


async def read_capped(response: aiohttp.ClientResponse, max_bytes: int, what: str) -> bytes:
    """The (already decompressed) body of an aiohttp response, refusing more than ``max_bytes``.

    The caller bounds the whole operation with ``asyncio.timeout``; aiohttp decodes gzip as it
    reads, so counting what it hands over caps the decoded size."""
    out = bytearray()
    length = response.content_length
    if length is not None and length > max_bytes and not response.headers.get("Content-Encoding"):
        raise PeerError(f"{what} announced {_size(length)}, more than {_size(max_bytes)}")
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        out += chunk
        if len(out) > max_bytes:
            raise PeerError(f"{what} sent more than {_size(max_bytes)}")
    return bytes(out)


def _size(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n} bytes"
