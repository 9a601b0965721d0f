"""A metrics page server on 127.0.0.1 for the scraper tests: it serves whatever page a test
sets, or misbehaves the way the test says (an error status, a trickle, an endless body, a
gzip bomb, silence)."""

from __future__ import annotations

import functools
import gzip
import socket
import time

from tests.helpers.servers import RawHttpServer


@functools.cache
def gzip_bomb() -> bytes:
    """About 64 KiB of gzip that inflates to 64 MiB: far past any cap the scraper sets."""
    return gzip.compress(b"\n" * (64 * 1024 * 1024), compresslevel=9)


class PageServer(RawHttpServer):
    """``mode``: ``page`` (``body`` with ``content_type``), ``status`` (``status`` with a
    short body), ``trickle`` (a Content-Length under any cap, then a byte every 50 ms), ``flood`` (an
    endless body without length), ``bomb`` (gzip inflating far past any cap), ``silent``
    (reads the request, answers nothing)."""

    path = "/metrics"

    def __init__(self, body: bytes = b"", content_type: str = "text/plain; version=0.0.4; charset=utf-8") -> None:
        self.body = body
        self.content_type = content_type
        self.mode = "page"
        self.status = 200
        self.requests = 0
        super().__init__()

    def _respond(self, sock: socket.socket, head: bytes) -> None:
        self.requests += 1
        mode = self.mode
        try:
            if mode == "page":
                self._send(sock, 200, self.body, self.content_type)
            elif mode == "status":
                self._send(sock, self.status, b"unavailable\n", "text/plain")
            elif mode == "trickle":
                sock.sendall(self._head(200, 32 * 1024, self.content_type))
                while not self._stop.wait(0.05):
                    sock.sendall(b"#")
            elif mode == "flood":
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
                chunk = b"# " + b"x" * 65_000 + b"\n"
                while not self._stop.is_set():
                    sock.sendall(chunk)
            elif mode == "bomb":
                body = gzip_bomb()
                head = self._head(200, len(body), self.content_type, extra="Content-Encoding: gzip\r\n")
                sock.sendall(head + body)
            elif mode == "silent":
                self._stop.wait(30)
        except OSError:
            pass  # the scraper gave up on this answer, as it should

    def _send(self, sock: socket.socket, status: int, body: bytes, content_type: str) -> None:
        sock.sendall(self._head(status, len(body), content_type) + body)

    @staticmethod
    def _head(status: int, length: int, content_type: str, extra: str = "") -> bytes:
        reason = {200: "OK", 500: "Internal Server Error", 404: "Not Found"}.get(status, "Status")
        return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n"
                f"{extra}Connection: close\r\n\r\n").encode()


def elapsed(start: float) -> float:
    return time.monotonic() - start
