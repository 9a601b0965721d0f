"""A minimal HTTP/1.1 server on asyncio answering ``GET /metrics`` with pre-rendered bytes.

Prometheus scrapes over one keep-alive connection, so the cost per scrape is one header
parse and one write of cached bytes; nothing here renders or compresses per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from rackscope.errors import ConfigError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024  # a scrape has no body; anything bigger is not for us
IDLE_TIMEOUT_S = 300.0  # keep-alive connections idle longer than this are closed
METRICS_PATHS = (b"/metrics", b"/")

# (gzip wanted) -> (body, content type, content encoding or None)
BodyProvider = Callable[[bool], tuple[bytes, str, str | None]]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large"}


def wants_gzip(accept_encoding: str) -> bool:
    """True when ``Accept-Encoding`` allows gzip (a ``q=0`` refuses it)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "*"):
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


class MetricsServer:
    """Serves ``body(gzip_wanted)`` on GET /metrics and /; 404 elsewhere, 405 for other methods."""

    def __init__(self, body: BodyProvider, host: str = "127.0.0.1", port: int = 9464) -> None:
        self._body = body
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.bound_port: int | None = None

    async def start(self) -> int:
        """Binds and starts accepting; returns the bound port (``port=0``: an ephemeral one)."""
        try:
            self._server = await asyncio.start_server(
                self._serve_connection, self._host, self._port, limit=MAX_HEADER_BYTES, reuse_address=True
            )
        except OSError as exc:
            raise ConfigError(f"cannot serve /metrics on {self._host}:{self._port}: {exc.strerror or exc}") from exc
        self.bound_port = int(self._server.sockets[0].getsockname()[1])
        log.info("serving Prometheus metrics on http://%s:%d/metrics", self._host, self.bound_port)
        return self.bound_port

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._connections):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while await self._serve_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the client went away or sent something we will not read
        except Exception:  # connection-task boundary: one bad request must not stop the server
            log.exception("metrics connection failed")
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answers one request; returns whether the connection stays open."""
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_S)
        lines = head.split(b"\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            await self._respond(writer, 400, b"bad request\n", keep_alive=False)
            return False
        method, target, version = parts
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        connection = headers.get(b"connection", b"").lower()
        keep_alive = connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
        length_text = headers.get(b"content-length", b"0")
        length = int(length_text) if length_text.isdigit() else -1
        if length < 0 or length > MAX_BODY_BYTES or b"transfer-encoding" in headers:
            await self._respond(writer, 413, b"request body not accepted\n", keep_alive=False)
            return False
        if length:
            await reader.readexactly(length)
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            await self._respond(writer, 405, b"method not allowed\n", keep_alive, extra=b"Allow: GET, HEAD\r\n")
        elif path not in METRICS_PATHS:
            await self._respond(writer, 404, b"not found: try /metrics\n", keep_alive)
        else:
            gzip_ok = wants_gzip(headers.get(b"accept-encoding", b"").decode("latin-1"))
            body, content_type, encoding = self._body(gzip_ok)
            extra = b"Vary: Accept-Encoding\r\n"
            if encoding:
                extra += b"Content-Encoding: " + encoding.encode() + b"\r\n"
            await self._respond(
                writer, 200, body, keep_alive, content_type.encode(), extra, head_only=method == b"HEAD"
            )
        return keep_alive

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        keep_alive: bool,
        content_type: bytes = b"text/plain; charset=utf-8",
        extra: bytes = b"",
        head_only: bool = False,
    ) -> None:
        head = (
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n"
            % (
                status,
                _REASONS[status].encode(),
                content_type,
                len(body),
                extra,
                b"" if keep_alive else b"Connection: close\r\n",
            )
        )
        writer.writelines((head,) if head_only else (head, body))
        await writer.drain()
