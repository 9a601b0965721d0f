"""The /metrics endpoint over real HTTP on 127.0.0.1: keep-alive, 404/405, HEAD, gzip,
concurrent scrapes, and a real Prometheus scraping it."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from rackscope.agent.telemetry import Telemetry
from rackscope.agent.telemetry.metrics_server import wants_gzip
from rackscope.errors import ConfigError
from tests.agent.telemetry.expected import INFOS, samples


def get(port: int, path: str = "/metrics", headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.fixture
async def served(make_telemetry: Callable[..., Telemetry]) -> object:
    telemetry = make_telemetry(metrics_port=0)
    telemetry.update(INFOS, samples(), 0.01, 0)
    port = await telemetry.serve()
    assert port == telemetry.metrics_port
    assert port > 0
    yield telemetry
    await telemetry.close()


async def test_scrape_returns_the_rendered_text(served: Telemetry) -> None:
    status, headers, body = await asyncio.to_thread(get, served.metrics_port or 0)
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert body == served.render()
    assert int(headers["content-length"]) == len(body)
    status_root, _, body_root = await asyncio.to_thread(get, served.metrics_port or 0, "/")
    assert (status_root, body_root) == (200, body)
    status_q, _, _ = await asyncio.to_thread(get, served.metrics_port or 0, "/metrics?name[]=x")
    assert status_q == 200


async def test_keep_alive_serves_several_requests_on_one_connection(served: Telemetry) -> None:
    def two_on_one() -> tuple[int, int, bool]:
        conn = http.client.HTTPConnection("127.0.0.1", served.metrics_port or 0, timeout=5)
        conn.request("GET", "/metrics")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        conn.request("GET", "/nope")
        second = conn.getresponse()
        second.read()
        same = conn.sock is sock and sock is not None
        conn.close()
        return first.status, second.status, same

    first, second, same_socket = await asyncio.to_thread(two_on_one)
    assert (first, second, same_socket) == (200, 404, True)


async def test_unknown_paths_and_methods(served: Telemetry) -> None:
    port = served.metrics_port or 0
    status, _, body = await asyncio.to_thread(get, port, "/favicon.ico")
    assert status == 404
    assert b"/metrics" in body
    status, headers, _ = await asyncio.to_thread(get, port, "/metrics", None, "POST")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    status, headers, body = await asyncio.to_thread(get, port, "/metrics", None, "HEAD")
    assert status == 200
    assert body == b""
    assert int(headers["content-length"]) == len(served.render())


async def test_gzip_when_asked(served: Telemetry) -> None:
    port = served.metrics_port or 0
    status, headers, body = await asyncio.to_thread(get, port, "/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == served.render()
    assert len(body) < len(served.render()) / 3
    _, headers, body = await asyncio.to_thread(get, port, "/metrics", {"Accept-Encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in headers
    assert body == served.render()


async def test_concurrent_scrapes_get_the_same_bytes(served: Telemetry) -> None:
    results = await asyncio.gather(*(asyncio.to_thread(get, served.metrics_port or 0) for _ in range(16)))
    assert {status for status, _, _ in results} == {200}
    assert {body for _, _, body in results} == {served.render()}


async def test_connection_close_and_http10(served: Telemetry) -> None:
    async def raw(request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.metrics_port)
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)  # the server closes: read to EOF
        writer.close()
        return data

    closed = await raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert closed.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n" in closed
    old = await raw(b"GET /metrics HTTP/1.0\r\n\r\n")
    assert old.startswith(b"HTTP/1.1 200 OK\r\n")
    bad = await raw(b"NONSENSE\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400 ")


async def test_close_stops_serving(make_telemetry: Callable[..., Telemetry]) -> None:
    telemetry = make_telemetry()
    port = await telemetry.serve(port=0)
    await telemetry.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.to_thread(get, port)


async def test_busy_port_is_a_config_error(make_telemetry: Callable[..., Telemetry]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        telemetry = make_telemetry(metrics_port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match="cannot serve /metrics"):
            await telemetry.serve()


@pytest.mark.parametrize(
    ("header", "wanted"),
    [("gzip", True), ("gzip, deflate", True), ("deflate, gzip;q=0.5", True), ("gzip;q=0", False),
     ("identity", False), ("", False), ("*", True)],
)
def test_accept_encoding(header: str, wanted: bool) -> None:
    assert wants_gzip(header) is wanted


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs the prometheus binary")
async def test_real_prometheus_scrapes_the_endpoint(served: Telemetry, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        prom_port = s.getsockname()[1]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: agent\n    static_configs: [{{targets: ['127.0.0.1:{served.metrics_port}']}}]\n"
    )
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def query(expr: str) -> list[dict[str, object]]:
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?query={urllib.parse.quote(expr)}"
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)["data"]["result"]  # type: ignore[no-any-return]

        def wait() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    up = query('up{job="agent"}')
                    power = query('hw_power_watts{gpu="0"}')
                    if up and power:
                        return up, power
                except OSError:
                    pass
                time.sleep(0.3)
            raise AssertionError("Prometheus did not scrape the agent in 30 s")

        up, power = await asyncio.to_thread(wait)
        assert up[0]["value"][1] == "1"  # type: ignore[index]
        assert power[0]["value"][1] == "612.25"  # type: ignore[index]
        assert power[0]["metric"]["hw_model"] == "NVIDIA GB300"  # type: ignore[index]
        counted = await asyncio.to_thread(query, "count(rackscope_gpu_throttle)")
        assert counted[0]["value"][1] == "9"  # type: ignore[index]
    finally:
        proc.terminate()
        proc.wait(10)
