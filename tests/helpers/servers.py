"""Servers on 127.0.0.1 that tests write their own answers for.

``RawHttpServer``: a thread per connection on plain sockets; it reads each request's head and
the subclass writes whatever bytes it wants back (a page, an error, a trickle, silence).

``LoopServer``: an asyncio server on its own event loop in a background thread, so async tests
and tests that start processes can both use it; the subclass handles each connection's streams.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import ssl
import threading
from typing import Self


class _ThreadingServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class RawHttpServer:
    """Serves on 127.0.0.1 (port 0) until ``close()``; each connection gets ``_answer``.

    ``_stop`` is set on ``close()``: answers that hang or trickle wait on it to end."""

    path = "/"  # what ``url`` points at

    def __init__(self) -> None:
        self._stop = threading.Event()
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server._answer(self.request)

        self._server = _ThreadingServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, sock: socket.socket) -> None:
        """Read the request head (a client that leaves before sending one gets nothing), then
        let ``_respond`` answer it."""
        sock.settimeout(5.0)
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                return
            head += data
        self._respond(sock, head)

    def _respond(self, sock: socket.socket, head: bytes) -> None:
        raise NotImplementedError


class LoopServer:
    """An asyncio server on 127.0.0.1 (port 0), serving while the ``with`` block lasts.

    Each connection runs ``_handle`` as a task; on exit the tasks still running are cancelled
    and awaited, and every connection's writer is closed."""

    def __init__(self, name: str, ssl_context: ssl.SSLContext | None = None) -> None:
        self.port = 0
        self._ssl = ssl_context
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection; return (or let the task be cancelled) when it is done."""
        raise NotImplementedError
