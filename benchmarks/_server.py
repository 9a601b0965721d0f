"""A minimal OpenAI-compatible streaming server with microsecond-controlled token timing.

Made for ``loadgen.py`` and the engine's timing test: it runs in its own process (pinned to
its own core when given one), sleeps until shortly before its next send and then polls its
sockets in a busy loop rather than trusting millisecond-granular timers, and sends each token
as its own HTTP chunk at ``first_s + k * itl_s`` after the request arrived, so a client's
timestamps can be checked against when the bytes really left (a fixed schedule, such as the
first token 80 ms after the request and then one every 8 ms, is what a client must see). It records the
receive time of every request and the send time of every token (``time.perf_counter``,
``CLOCK_MONOTONIC`` on Linux, so the client process can compare) and hands them over on the
control pipe.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (always
streamed, chunked, vLLM-shaped chunks, final ``usage`` chunk when asked, ``[DONE]``). The
request body may carry ``ttft_ms`` and ``itl_ms`` to set one request's timing. Loopback only.

Run on its own (``python _server.py --ttft-ms 80 --itl-ms 8``) it prints its port, serves
until its standard input closes, then prints one JSON line: how late its sends were against
the schedule (p50, p99, ms), how many it made and, per request id, when the request arrived
and when each token left.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection

import orjson

_now = time.perf_counter
# Sleep in epoll until this long before the next send is due, then poll without sleeping:
# epoll's timeout is millisecond-grained and its wake-up takes tens of microseconds.
SPIN_AHEAD_S = 0.002
IDLE_POLL_S = 0.05
# Kernel receive timestamps (Linux): when a request reached the socket, however busy the
# server was, so a client's TTFT is not charged with the server's own queueing.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("qq")


@dataclass
class _Stream:
    conn: _Client
    rid: str
    recv_s: float
    first_s: float
    itl_s: float
    tokens: int
    chunk: bytes
    last: bytes
    sent: int = 0
    sends: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]


@dataclass
class _Client:
    sock: socket.socket
    inbuf: bytes = b""
    out: bytearray = field(default_factory=bytearray)
    alive: bool = True
    writing: bool = False


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: object) -> bytes:
    return _chunk(b"data: " + orjson.dumps(obj) + b"\n\n")


class Server:
    def __init__(self, model: str, ttft_s: float, itl_s: float) -> None:
        self.model = model
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1024)
        self.lsock.setblocking(False)
        self.port: int = self.lsock.getsockname()[1]
        self.ep = select.epoll()
        self.ep.register(self.lsock.fileno(), select.EPOLLIN)
        self.clients: dict[int, _Client] = {}
        self.heap: list[tuple[float, int, _Stream]] = []
        self.seq = 0
        self.done: list[_Stream] = []

    # -- sockets ------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.lsock.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.clients[sock.fileno()] = _Client(sock)
            self.ep.register(sock.fileno(), select.EPOLLIN)

    def _close(self, c: _Client) -> None:
        if c.alive:
            c.alive = False
            fd = c.sock.fileno()
            self.clients.pop(fd, None)
            self.ep.unregister(fd)
            c.sock.close()

    def _write(self, c: _Client, data: bytes) -> None:
        if not c.alive:
            return
        if c.out:
            c.out += data
            return
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._close(c)
            return
        if n < len(data):
            c.out += data[n:]
            c.writing = True
            self.ep.modify(c.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, c: _Client) -> None:
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self._close(c)
            return
        del c.out[:n]
        if not c.out and c.writing:
            c.writing = False
            self.ep.modify(c.sock.fileno(), select.EPOLLIN)

    def _read(self, c: _Client, t: float) -> None:
        try:
            data, ancillary, _, _ = c.sock.recvmsg(65536, socket.CMSG_SPACE(_TIMESPEC.size))
        except BlockingIOError:
            return
        except OSError:
            data, ancillary = b"", []
        if not data:
            self._close(c)
            return
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(value)
                # The stamp is CLOCK_REALTIME; move it onto perf_counter's clock.
                t = sec + nsec * 1e-9 - (time.time() - _now())
        c.inbuf += data
        while True:
            end = c.inbuf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = c.inbuf[:end].split(b"\r\n")
            length = 0
            rid = ""
            for line in head[1:]:
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                if lname == b"content-length":
                    length = int(value)
                elif lname == b"x-request-id":
                    rid = value.strip().decode()
            if len(c.inbuf) < end + 4 + length:
                return
            body = c.inbuf[end + 4 : end + 4 + length]
            c.inbuf = c.inbuf[end + 4 + length :]
            method, path = head[0].split(b" ")[:2]
            self._route(c, method, path, body, rid, t)

    # -- HTTP -------------------------------------------------------------------------------

    def _route(self, c: _Client, method: bytes, path: bytes, body: bytes, rid: str, t: float) -> None:
        if method == b"GET" and path == b"/v1/models":
            payload = orjson.dumps({"object": "list", "data": [{"id": self.model, "object": "model"}]})
            self._write(
                c,
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(payload), payload),
            )
            return
        if method != b"POST" or path not in (b"/v1/completions", b"/v1/chat/completions"):
            self._write(c, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        req = orjson.loads(body)
        chat = path == b"/v1/chat/completions"
        tokens = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
        ttft_s = float(req["ttft_ms"]) / 1e3 if "ttft_ms" in req else self.ttft_s
        itl_s = float(req["itl_ms"]) / 1e3 if "itl_ms" in req else self.itl_s
        usage = bool((req.get("stream_options") or {}).get("include_usage"))
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        cid = f"cmpl-{rid}"
        base = {"id": cid, "created": 1700000000, "model": self.model}
        if chat:
            base["object"] = "chat.completion.chunk"
            head += _event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})

            def choice(finish: str | None) -> dict[str, object]:
                return {"index": 0, "delta": {"content": " tok"}, "logprobs": None, "finish_reason": finish}
        else:
            base["object"] = "text_completion"

            def choice(finish: str | None) -> dict[str, object]:
                return {"index": 0, "text": " tok", "logprobs": None, "finish_reason": finish, "stop_reason": None}

        chunk = _event({**base, "choices": [choice(None)]})
        last = _event({**base, "choices": [choice("length")]})
        if usage:
            prompt_tokens = len(req.get("prompt") or "") if not chat else 8
            last += _event(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "total_tokens": prompt_tokens + tokens,
                        "completion_tokens": tokens,
                    },
                }
            )
        last += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self._write(c, head)
        st = _Stream(c, rid, t, t + ttft_s, itl_s, tokens, chunk, last)
        self._push(st.first_s, st)

    def _push(self, due_s: float, st: _Stream) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (due_s, self.seq, st))

    def _fire(self, st: _Stream) -> None:
        if not st.conn.alive:
            return
        st.sent += 1
        final = st.sent >= st.tokens
        # Stamped before the write: on loopback the bytes reach the client during send().
        st.sends.append(_now())
        self._write(st.conn, st.last if final else st.chunk)
        if final:
            self.done.append(st)
        else:
            self._push(st.first_s + st.sent * st.itl_s, st)

    # -- loop -------------------------------------------------------------------------------

    def run(self, ctrl: Connection) -> None:
        ctrl_fd = ctrl.fileno()
        self.ep.register(ctrl_fd, select.EPOLLIN)
        heap = self.heap
        while True:
            now = _now()
            while heap and heap[0][0] <= now:
                self._fire(heapq.heappop(heap)[2])
            # Sleep until shortly before the next send (new requests and data wake the poll at
            # once; a request's arrival is its kernel receive time anyway), then spin.
            wait_s = heap[0][0] - now - SPIN_AHEAD_S if heap else IDLE_POLL_S
            ready = self.ep.poll(min(wait_s, IDLE_POLL_S) if wait_s > 0 else 0.0)
            # One arrival time for everything this poll returned (requests get their kernel
            # receive time instead, where the platform gives one).
            t_poll = _now()
            for fd, ev in ready:
                if fd == ctrl_fd:
                    if not self._command(ctrl):
                        return
                    continue
                if fd == self.lsock.fileno():
                    self._accept()
                    continue
                c = self.clients.get(fd)
                if c is None:
                    continue
                if ev & select.EPOLLOUT:
                    self._flush(c)
                if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._read(c, t_poll)

    def _command(self, ctrl: Connection) -> bool:
        cmd = ctrl.recv()
        if cmd == "stop":
            return False
        if cmd == "stats":
            # Per finished request: when it arrived and when each token left.
            ctrl.send({st.rid: (st.recv_s, st.sends.tolist()) for st in self.done})
            self.done = []
        elif isinstance(cmd, tuple) and cmd[0] == "timing":
            self.ttft_s, self.itl_s = cmd[1], cmd[2]
            ctrl.send("ok")
        return True


def serve(ctrl: Connection, model: str, ttft_s: float, itl_s: float, cpu: int | None) -> None:
    """Process entry point: sends the port on ``ctrl``, then serves until told "stop"."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    server = Server(model, ttft_s, itl_s)
    ctrl.send(server.port)
    try:
        server.run(ctrl)
    finally:
        ctrl.send(time.process_time())


def lateness_ms(log: dict[str, tuple[float, list[float]]], ttft_s: float, itl_s: float) -> list[float]:
    """Every send's delay behind the fixed schedule (first token ``ttft_s`` after the request
    arrived, then one every ``itl_s``), in ms, ascending."""
    late = [(s - recv_s - ttft_s - k * itl_s) * 1e3 for recv_s, sends in log.values() for k, s in enumerate(sends)]
    return sorted(late)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="an OpenAI-compatible streaming server with a fixed token schedule")
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--ttft-ms", type=float, default=80.0, help="first token this long after the request")
    parser.add_argument("--itl-ms", type=float, default=8.0, help="then one token every this long")
    args = parser.parse_args(argv)
    server = Server(args.model, args.ttft_ms / 1e3, args.itl_ms / 1e3)
    print(server.port, flush=True)
    # The serving loop takes its commands from a pipe; standard input closing says "stop". The
    # log is read on that thread too: a large one would not fit the pipe while the loop runs.
    ctrl, ours = Pipe()
    logs: list[dict[str, tuple[float, list[float]]]] = []

    def watch_stdin() -> None:
        sys.stdin.read()
        ours.send("stats")
        logs.append(ours.recv())
        ours.send("stop")

    watcher = threading.Thread(target=watch_stdin, daemon=True)
    watcher.start()
    server.run(ctrl)
    watcher.join()
    late = lateness_ms(logs[0], args.ttft_ms / 1e3, args.itl_ms / 1e3)

    def pick(q: float) -> float | None:
        return late[min(len(late) - 1, int(q * len(late)))] if late else None

    summary = {"sends": len(late), "late_p50_ms": pick(0.5), "late_p99_ms": pick(0.99), "log": logs[0]}
    print(json.dumps(summary), flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
