"""``rackscope.peers``: one bounded HTTP request against small real servers on 127.0.0.1.

Each server runs a script per connection (send these bytes, pause, hang, close), so every way a
peer can misbehave is a few lines; the client under test is the real one, on real sockets.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator

import aiohttp
import pytest

from rackscope.errors import PeerError
from rackscope.peers import MIB, READ_SLICE_S, Deadline, Target, fetch, inflate, read_capped

Script = Callable[[socket.socket, bytes], None]
SLACK_S = 0.5  # scheduling on a busy machine, on top of what the client may take


class Peer:
    """Accepts connections on 127.0.0.1, reads each request head, then runs ``script``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def target(self, path: str = "/metrics") -> Target:
        return Target.parse(f"http://127.0.0.1:{self.port}{path}")

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5.0)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    data = conn.recv(4096)
                    if not data:
                        return
                    request += data
                self.requests.append(request)
                self.script(conn, request)
            except OSError:
                pass  # the client left: that is what several tests are about

    def hang(self) -> None:
        self.stop.wait(30.0)

    def close(self) -> None:
        self.stop.set()
        self._listener.close()


@pytest.fixture
def peer() -> Iterator[Callable[[Script], Peer]]:
    started: list[Peer] = []

    def start(script: Script) -> Peer:
        server = Peer(script)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def answer(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{h}\r\n" for h in headers)
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def replying(data: bytes) -> Script:
    return lambda conn, _request: conn.sendall(data)


def gzip_members(decoded_bytes: int, member_bytes: int) -> bytes:
    """Concatenated gzip members of zeros, each compressed once a MiB at a time."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    member = b"".join(compressor.compress(bytes(MIB)) for _ in range(member_bytes // MIB)) + compressor.flush()
    return member * (decoded_bytes // member_bytes)


def timed(call: Callable[[], object]) -> tuple[BaseException | object, float]:
    started = time.monotonic()
    try:
        outcome: BaseException | object = call()
    except PeerError as exc:
        outcome = exc
    return outcome, time.monotonic() - started


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("url", "https", "host", "port", "path", "what", "host_header"),
    [
        ("http://127.0.0.1:9400/metrics", False, "127.0.0.1", 9400, "/metrics", "http://127.0.0.1:9400/metrics",
         "127.0.0.1:9400"),
        ("https://exporter.example/m?x=1", True, "exporter.example", 443, "/m?x=1", "https://exporter.example/m",
         "exporter.example"),
        ("http://user:secret@h:80", False, "h", 80, "/", "http://h:80/", "h"),
        ("http://[::1]:9400/metrics", False, "::1", 9400, "/metrics", "http://[::1]:9400/metrics", "[::1]:9400"),
    ],
)  # fmt: skip
def test_target_parse(
    url: str, https: bool, host: str, port: int, path: str, what: str, host_header: str
) -> None:
    target = Target.parse(url)
    assert (target.https, target.host, target.port, target.path, target.what) == (https, host, port, path, what)
    assert target.host_header == host_header
    assert "secret" not in target.what


@pytest.mark.parametrize(
    "url", ["localhost:9400/metrics", "ftp://h/metrics", "http://h:x/", "http:///metrics", "http://h/a b", "http://h/\x7f"]
)
def test_target_parse_refuses(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        Target.parse(url)


def test_deadline() -> None:
    with pytest.raises(ValueError, match="positive"):
        Deadline(0)
    deadline = Deadline(10.0)
    assert 9.0 < deadline.remaining() <= 10.0
    assert not deadline.expired


# --------------------------------------------------------------------------- answers that are fine


def test_get_with_content_length(peer: Callable[[Script], Peer]) -> None:
    server = peer(replying(answer(b"metrics text\n", "Content-Type: text/plain", "X-Twice: a", "x-twice: b")))
    response = fetch(
        Target.parse(f"http://127.0.0.1:{server.port}/metrics?debug=1"),
        deadline_s=2.0,
        max_bytes=1024,
        headers={"Accept": "text/plain"},
    )
    assert (response.status, response.reason, response.body) == (200, "OK", b"metrics text\n")
    assert response.headers["content-type"] == "text/plain"
    assert response.headers["x-twice"] == "a, b"
    request = server.requests[0].decode()
    assert request.startswith("GET /metrics?debug=1 HTTP/1.1\r\n")
    for line in (f"Host: 127.0.0.1:{server.port}", "Accept-Encoding: gzip", "Connection: close", "Accept: text/plain"):
        assert f"\r\n{line}\r\n" in request


def test_post_sends_its_body(peer: Callable[[Script], Peer]) -> None:
    received: list[bytes] = []

    def script(conn: socket.socket, request: bytes) -> None:
        received.append(request.split(b"\r\n\r\n", 1)[1] or conn.recv(100))
        conn.sendall(answer(b"", status="204 No Content"))

    server = peer(script)
    response = fetch(server.target("/v1/runs"), deadline_s=2.0, max_bytes=10, method="POST", body=b'{"a":1}')
    assert (response.status, response.body) == (204, b"")
    assert received == [b'{"a":1}']
    assert b"Content-Length: 7\r\n" in server.requests[0]


def test_chunked_with_extensions_and_trailers(peer: Callable[[Script], Peer]) -> None:
    body = b"5;name=x\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n"
    server = peer(replying(answer(body, "Transfer-Encoding: chunked")))
    assert fetch(server.target(), deadline_s=2.0, max_bytes=100).body == b"hello, world"


def test_body_delimited_by_close(peer: Callable[[Script], Peer]) -> None:
    server = peer(replying(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"))
    assert fetch(server.target(), deadline_s=2.0, max_bytes=100).body == b"until the end"


@pytest.mark.parametrize(
    ("encoding", "encoded"),
    [
        ("gzip", gzip.compress(b"a" * 5000)),
        ("deflate", zlib.compress(b"a" * 5000)),
        ("gzip", gzip.compress(b"a" * 2500) + gzip.compress(b"a" * 2500)),  # two members
    ],
)
def test_compressed_bodies_are_decoded(peer: Callable[[Script], Peer], encoding: str, encoded: bytes) -> None:
    server = peer(replying(answer(encoded, f"Content-Encoding: {encoding}")))
    assert fetch(server.target(), deadline_s=2.0, max_bytes=5000).body == b"a" * 5000


def test_statuses_are_returned_and_interim_answers_skipped(peer: Callable[[Script], Peer]) -> None:
    server = peer(replying(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"oops", status="500 Internal Server Error")))
    response = fetch(server.target(), deadline_s=2.0, max_bytes=100)
    assert (response.status, response.reason, response.body) == (500, "Internal Server Error", b"oops")


def test_head_reads_no_body(peer: Callable[[Script], Peer]) -> None:
    server = peer(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nContent-Encoding: gzip\r\n\r\n"))
    response = fetch(server.target(), deadline_s=2.0, max_bytes=10, method="HEAD")
    assert (response.status, response.body, response.headers["content-length"]) == (200, b"", "1000000")


@pytest.mark.slow
def test_a_peer_that_pauses_longer_than_a_read_slice_is_read_whole(peer: Callable[[Script], Peer]) -> None:
    pause_s = 3 * READ_SLICE_S
    whole = answer(b"first half, second half")

    def script(conn: socket.socket, _request: bytes) -> None:
        for piece in (whole[:7], whole[7:30], whole[30:-11], whole[-11:]):  # mid status line, mid head, mid body
            conn.sendall(piece)
            time.sleep(pause_s)

    server = peer(script)
    response = fetch(server.target(), deadline_s=5.0, max_bytes=100)
    assert (response.status, response.body) == (200, b"first half, second half")


def test_a_name_is_looked_up(peer: Callable[[Script], Peer]) -> None:
    server = peer(replying(answer(b"ok")))
    target = Target.parse(f"http://localhost:{server.port}/")
    try:
        response = fetch(target, deadline_s=2.0, max_bytes=10)
    except PeerError as exc:
        if "Connection refused (::1)" in str(exc):
            pytest.skip("localhost resolves only to ::1 here")
        raise
    assert response.body == b"ok"
    assert f"Host: localhost:{server.port}".encode() in server.requests[0]


# --------------------------------------------------------------------------- peers that stall


@pytest.mark.slow
def test_a_trickle_ends_at_the_deadline(peer: Callable[[Script], Peer]) -> None:
    def script(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        for _ in range(1000):
            conn.sendall(b"x")
            if server.stop.wait(0.05):
                return

    server = peer(script)
    outcome, took_s = timed(lambda: fetch(server.target(), deadline_s=0.5, max_bytes=MIB))
    assert isinstance(outcome, PeerError)
    assert "did not finish answering within 0.5 s" in str(outcome)
    assert 0.5 <= took_s < 0.5 + SLACK_S


def test_a_peer_that_never_answers_ends_at_the_deadline(peer: Callable[[Script], Peer]) -> None:
    server = peer(lambda _conn, _request: server.hang())
    outcome, took_s = timed(lambda: fetch(server.target(), deadline_s=0.3, max_bytes=100))
    assert isinstance(outcome, PeerError)
    assert str(outcome) == f"http://127.0.0.1:{server.port}/metrics: did not answer within 0.3 s"
    assert 0.3 <= took_s < 0.3 + SLACK_S


@pytest.mark.slow
def test_a_content_length_longer_than_the_body_then_silence(peer: Callable[[Script], Peer]) -> None:
    def script(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        server.hang()

    server = peer(script)
    outcome, took_s = timed(lambda: fetch(server.target(), deadline_s=0.4, max_bytes=1000))
    assert isinstance(outcome, PeerError)
    assert "did not finish answering within 0.4 s" in str(outcome)
    assert took_s < 0.4 + SLACK_S


def test_a_content_length_longer_than_the_body_then_close(peer: Callable[[Script], Peer]) -> None:
    server = peer(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"))
    with pytest.raises(PeerError, match="closed the connection after 9 of 100 bytes"):
        fetch(server.target(), deadline_s=2.0, max_bytes=1000)


def test_the_stop_flag_ends_a_request_in_progress(peer: Callable[[Script], Peer]) -> None:
    server = peer(lambda _conn, _request: server.hang())
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    outcome, took_s = timed(lambda: fetch(server.target(), deadline_s=30.0, max_bytes=100, stop=stop))
    assert isinstance(outcome, PeerError)
    assert "stopped while waiting for an answer" in str(outcome)
    assert took_s < 0.2 + READ_SLICE_S + SLACK_S


def test_a_stop_flag_already_set_sends_nothing(peer: Callable[[Script], Peer]) -> None:
    server = peer(replying(answer(b"ok")))
    stop = threading.Event()
    stop.set()
    with pytest.raises(PeerError, match="stopped"):
        fetch(server.target(), deadline_s=2.0, max_bytes=100, stop=stop)
    assert fetch(server.target("/after"), deadline_s=2.0, max_bytes=100).body == b"ok"
    assert [r.split(b" ")[1] for r in server.requests] == [b"/after"]


# --------------------------------------------------------------------------- peers that send too much


def test_an_announced_length_over_the_cap_is_refused_unread(peer: Callable[[Script], Peer]) -> None:
    def script(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")
        server.hang()

    server = peer(script)
    outcome, took_s = timed(lambda: fetch(server.target(), deadline_s=5.0, max_bytes=MIB))
    assert isinstance(outcome, PeerError)
    assert "announced 1024 MiB, more than 1 MiB" in str(outcome)
    assert took_s < SLACK_S


def test_an_endless_chunked_body_is_cut_at_the_cap(peer: Callable[[Script], Peer]) -> None:
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"y" * 64 * 1024)

    def script(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not server.stop.is_set():
            conn.sendall(chunk)

    server = peer(script)
    with pytest.raises(PeerError, match="sent more than 1 MiB"):
        fetch(server.target(), deadline_s=5.0, max_bytes=MIB)


@pytest.mark.slow
@pytest.mark.parametrize(("decoded_mib", "member_mib"), [(1024, 64), (128, 128)])
def test_a_gzip_bomb_is_cut_at_the_decoded_cap_without_inflating_it(
    peer: Callable[[Script], Peer], decoded_mib: int, member_mib: int
) -> None:
    bomb = gzip_members(decoded_mib * MIB, member_mib * MIB)
    server = peer(replying(answer(bomb, "Content-Encoding: gzip")))
    tracemalloc.start()
    try:
        with pytest.raises(PeerError, match=r"sent more than 1 MiB \(decoded\)"):
            fetch(server.target(), deadline_s=10.0, max_bytes=MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB, f"{peak / MIB:.1f} MiB allocated to refuse a bomb"


# --------------------------------------------------------------------------- malformed answers


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "closed the connection without answering"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "closed the connection in the middle of the response head"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", "malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n", "a chunk is longer than 2"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "unsupported Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nxx", "unsupported Content-Encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nxxxx", "corrupt compressed body"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", "the response head is longer than 65536 bytes"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 101 + b"\r\n", "more than 100 header lines"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 4000, "the response head is longer than 65536 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000 + b"\r\n", "a chunk size is longer"),
    ],
)
def test_malformed_answers_are_errors(peer: Callable[[Script], Peer], data: bytes, message: str) -> None:
    server = peer(replying(data))
    with pytest.raises(PeerError, match=message):
        fetch(server.target(), deadline_s=2.0, max_bytes=1000)


def test_an_unreachable_peer() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(PeerError, match=r"cannot connect: Connection refused \(127\.0\.0\.1\)"):
        fetch(Target.parse(f"http://127.0.0.1:{port}/"), deadline_s=2.0, max_bytes=10)


def test_request_headers_cannot_inject_lines(peer: Callable[[Script], Peer]) -> None:
    server = peer(replying(answer(b"")))
    with pytest.raises(ValueError, match="bad request header"):
        fetch(server.target(), deadline_s=2.0, max_bytes=10, headers={"X-A": "1\r\nX-Injected: 2"})
    with pytest.raises(ValueError, match="bad request method"):
        fetch(server.target(), deadline_s=2.0, max_bytes=10, method="GET / HTTP/1.1\r\nX:")
    assert server.requests == []


# --------------------------------------------------------------------------- decoding on its own


def test_inflate() -> None:
    assert inflate(gzip.compress(b"abc"), "gzip", 3) == b"abc"
    assert inflate(b"abc", None, 3) == b"abc"
    with pytest.raises(PeerError, match="more than 2 bytes"):
        inflate(gzip.compress(b"abc"), "gzip", 2)
    with pytest.raises(PeerError, match="truncated compressed body"):
        inflate(gzip.compress(b"abc" * 100)[:-12], "gzip", 1000)
    with pytest.raises(PeerError, match="data after the end"):
        inflate(zlib.compress(b"abc") + b"more", "deflate", 1000)


async def test_read_capped_through_aiohttp(peer: Callable[[Script], Peer]) -> None:
    small = peer(replying(answer(gzip.compress(b"z" * 1000), "Content-Encoding: gzip")))
    large = peer(replying(answer(gzip.compress(b"z" * 5000), "Content-Encoding: gzip")))
    announced = peer(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n"))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{small.port}/") as response:
            assert await read_capped(response, 1000, "GET /") == b"z" * 1000
        async with session.get(f"http://127.0.0.1:{large.port}/") as response:
            with pytest.raises(PeerError, match="GET / sent more than 1000 bytes"):
                await read_capped(response, 1000, "GET /")
        async with session.get(f"http://127.0.0.1:{announced.port}/") as response:
            with pytest.raises(PeerError, match="GET / announced 99999 bytes"):
                await asyncio.wait_for(read_capped(response, 1000, "GET /"), 2.0)
