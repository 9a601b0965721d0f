"""A real ``rackscope agent --source dcgm`` against a dcgm-exporter that stalls, lies, inflates
or sends impossible readings.

The exporter is a TCP server on 127.0.0.1 written for these tests: it serves a recorded
dcgm-exporter page, or answers the way a test tells it to (a large Content-Length and then one
byte a second; a Content-Length longer than the body and then silence; a gzip body that inflates
to 1 GiB). The agent runs as a real process under an address-space limit, and every assertion
goes through what it serves on /metrics, its stderr, its exit code and /proc.
"""

from __future__ import annotations

import functools
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import rackscope_command, start_limited, stop_process, wait_for
from tests.helpers.servers import RawHttpServer

pytestmark = pytest.mark.slow

PAGE = (Path(__file__).parents[1] / "agent" / "sources" / "data" / "h100x4_exporter3.prom").read_text()
ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
ENERGY_MJ = {0: 4318472215, 1: 4297710348, 3: 4263350612}  # the recorded counters
MEMORY_LIMIT_MIB = 1536
INTERVAL_S = 0.5
MIB = 1024 * 1024
BOMB_DECODED_BYTES = 1024 * MIB
BOMB_MEMBER_BYTES = 64 * MIB
TRICKLE_LENGTH = 4 * MIB  # what a trickling answer announces: large, yet under the agent's cap
EXIT_WITHIN_S = 2.0
# Text a label value carries after a newline: written to a log unescaped, it would pass for a
# log line of its own.
FORGED = "2030-01-01 00:00:00,000 ERROR rackscope.agent: forged"
READY = re.compile(r"rackscope agent ready metrics_port=(\d+)")
# Labels that tell a GPU's series of one metric apart, shortened to their last word in keys.
DISTINGUISHING_LABELS = ("rackscope_energy_method", "reason", "network_io_direction", "link")


def set_value(text: str, metric: str, gpu: int, value: object) -> str:
    out = []
    for line in text.splitlines():
        if line.startswith(metric + "{") and f'gpu="{gpu}"' in line:
            line = f"{line[: line.rindex('}') + 1]} {value}"
        out.append(line)
    return "\n".join(out) + "\n"


def with_newline_in_hostname(text: str) -> str:
    # The text format escapes a newline in a label value as \n; the parser turns it back.
    return text.replace('Hostname="hgx-h100-03"', f'Hostname="hgx-h100-03\\n{FORGED}"')


@functools.cache
def gzip_bomb() -> bytes:
    """About 1 MB of gzip that inflates to 1 GiB of zeros: one compressed member of 64 MiB,
    repeated (concatenated gzip members decode to the concatenation). Built a MiB at a time."""
    zeros = bytes(MIB)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    member = b"".join(compressor.compress(zeros) for _ in range(BOMB_MEMBER_BYTES // MIB)) + compressor.flush()
    return member * (BOMB_DECODED_BYTES // BOMB_MEMBER_BYTES)


class HostileExporter(RawHttpServer):
    """Answers each scrape according to ``mode``: ``page`` (``page_for(scrape number)``),
    ``trickle``, ``lie`` or ``bomb``. ``stalled`` counts answers left hanging right now."""

    path = "/metrics"

    def __init__(self, page_for: Callable[[int], str]) -> None:
        self.page_for = page_for
        self.mode = "page"
        self.scrapes = 0
        self.stalled = 0
        self._lock = threading.Lock()
        super().__init__()

    def _respond(self, sock: socket.socket, head: bytes) -> None:
        with self._lock:
            mode, number = self.mode, self.scrapes
            self.scrapes += 1
        if mode == "page":
            body = self.page_for(number).encode()
            sock.sendall(self._head(len(body)) + body)
        elif mode == "bomb":
            bomb = gzip_bomb()
            sock.sendall(self._head(len(bomb), "Content-Encoding: gzip\r\n") + bomb)
        elif mode == "trickle":
            body = self.page_for(number).encode()
            sock.sendall(self._head(TRICKLE_LENGTH))
            self._hang(sock, body)
        elif mode == "lie":
            body = self.page_for(number).encode()
            sock.sendall(self._head(len(body) + 100_000) + body)
            self._hang(sock, b"")

    def _hang(self, sock: socket.socket, trickle: bytes) -> None:
        """One byte of ``trickle`` a second (nothing at all once it runs out), until the client
        leaves or the exporter closes."""
        with self._lock:
            self.stalled += 1
        try:
            for position in range(TRICKLE_LENGTH):
                if self._stop.wait(1.0):
                    return
                if position < len(trickle):
                    sock.sendall(trickle[position : position + 1])
                elif _peer_left(sock):
                    return
        except OSError:
            return  # the client hung up
        finally:
            with self._lock:
                self.stalled -= 1

    @staticmethod
    def _head(length: int, extra: str = "") -> bytes:
        return (
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            f"Content-Length: {length}\r\n{extra}Connection: close\r\n\r\n"
        ).encode()


def _peer_left(sock: socket.socket) -> bool:
    sock.settimeout(0.0)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    finally:
        sock.settimeout(5.0)


@dataclass
class Agent:
    proc: subprocess.Popen[str]
    metrics_port: int
    stderr: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, dict[str, float]]:
        """Every GPU series as {metric name: {gpu label (+ other labels): value}} plus agent health."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        out: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                key = labels.get("gpu", "") + "".join(
                    f",{k.rsplit('_', 1)[-1]}={v}" for k, v in sorted(labels.items()) if k in DISTINGUISHING_LABELS
                )
                out.setdefault(sample.name, {})[key] = sample.value
        return out

    def up(self) -> dict[str, float]:
        return self.metrics().get("rackscope_gpu_up", {})

    def errors(self) -> float:
        return self.metrics()["rackscope_agent_collection_errors_total"][""]

    def peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")


@pytest.fixture
def exporter() -> Iterator[HostileExporter]:
    served = HostileExporter(lambda _n: with_newline_in_hostname(PAGE))
    yield served
    served.close()


@pytest.fixture
def start_agent() -> Iterator[Callable[[HostileExporter], Agent]]:
    started: list[Agent] = []

    def start(exporter: HostileExporter) -> Agent:
        proc = start_limited(
            rackscope_command(
                "agent", "--source", "dcgm", "--dcgm-url", exporter.url, "--interval", str(INTERVAL_S),
                "--metrics-port", "0", "--no-api", "--rack", "r1", "--node", "n1",
            ),
            memory_mib=MEMORY_LIMIT_MIB,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        agent = Agent(proc, 0)
        started.append(agent)
        ready = threading.Event()

        def read_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                agent.stderr.append(line)
                match = READY.search(line)
                if match:
                    agent.metrics_port = int(match.group(1))
                    ready.set()

        threading.Thread(target=read_stderr, daemon=True).start()
        wait_for("the agent's ready line", lambda: ready.is_set() or proc.poll() is not None, timeout_s=60)
        assert ready.is_set(), "agent exited before it was ready:\n" + "".join(agent.stderr)
        wait_for("every GPU up", lambda: agent.up() == {str(i): 1.0 for i in range(4)})
        return agent

    yield start
    for agent in started:
        stop_process(agent.proc)


def sigterm_exit(agent: Agent) -> tuple[int, float]:
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    try:
        code = agent.proc.wait(EXIT_WITHIN_S + 3.0)
    except subprocess.TimeoutExpired:
        return -999, time.monotonic() - started
    return code, time.monotonic() - started


@pytest.mark.parametrize("mode", ["trickle", "lie"])
def test_a_stalling_exporter_is_reported_down_then_up_and_never_blocks_shutdown(
    exporter: HostileExporter, start_agent: Callable[[HostileExporter], Agent], mode: str
) -> None:
    agent = start_agent(exporter)
    assert "hw_power_watts" in agent.metrics()
    errors_before = agent.errors()

    exporter.mode = mode
    wait_for("every GPU down", lambda: agent.up() == {str(i): 0.0 for i in range(4)}, timeout_s=10)
    down = agent.metrics()
    # Nothing from before the stall is served as if it were fresh.
    assert "hw_power_watts" not in down
    assert "hw_energy_joules_total" not in down
    errors_down = agent.errors()
    assert errors_down > errors_before
    wait_for("the error count to keep rising", lambda: agent.errors() >= errors_down + 8, timeout_s=10)
    assert agent.up() == {str(i): 0.0 for i in range(4)}

    exporter.mode = "page"
    wait_for("every GPU up again", lambda: agent.up() == {str(i): 1.0 for i in range(4)}, timeout_s=10)
    assert agent.metrics()["hw_power_watts"]["0"] == pytest.approx(612.871)

    exporter.mode = mode
    wait_for("a scrape hanging on the exporter", lambda: exporter.stalled > 0, timeout_s=10)
    code, took_s = sigterm_exit(agent)
    assert (code, took_s < EXIT_WITHIN_S) == (0, True), f"exit code {code} after {took_s:.2f} s"


def test_a_gzip_bomb_is_cut_at_the_size_cap(
    exporter: HostileExporter, start_agent: Callable[[HostileExporter], Agent]
) -> None:
    gzip_bomb()  # built before the agent asks, so the exporter answers at once
    agent = start_agent(exporter)
    peak_before = agent.peak_rss_bytes()
    errors_before = agent.errors()

    exporter.mode = "bomb"
    wait_for("three bombs refused", lambda: agent.errors() >= errors_before + 3 * 4, timeout_s=30)
    assert agent.proc.poll() is None
    assert agent.up() == {str(i): 0.0 for i in range(4)}
    grown = agent.peak_rss_bytes() - peak_before
    assert grown < 96 * MIB, f"peak RSS grew by {grown / MIB:.0f} MiB reading a bomb"
    assert any("more than" in line and "decoded" in line for line in agent.stderr), "".join(agent.stderr)

    exporter.mode = "page"
    wait_for("every GPU up again", lambda: agent.up() == {str(i): 1.0 for i in range(4)}, timeout_s=10)


def test_an_energy_counter_stepping_back_is_jitter_not_a_reset(
    exporter: HostileExporter, start_agent: Callable[[HostileExporter], Agent]
) -> None:
    def page(n: int) -> str:
        text = set_value(PAGE, ENERGY, 0, ENERGY_MJ[0] - 500 * n)  # 0.5 J back at each scrape
        return set_value(text, ENERGY, 1, ENERGY_MJ[1] + 100_000 * n)  # 100 J forward at each scrape

    exporter.page_for = page
    agent = start_agent(exporter)
    seen: list[tuple[float, float]] = []

    def collect() -> bool:
        energy = agent.metrics().get("hw_energy_joules_total", {})
        point = (energy.get("0,method=counter"), energy.get("1,method=counter"))
        if None not in point and (not seen or point != seen[-1]):
            seen.append((float(point[0] or 0), float(point[1] or 0)))
        return len(seen) >= 6

    wait_for("six distinct energy readings", collect, timeout_s=20)
    jittery = [gpu0 for gpu0, _ in seen]
    steady = [gpu1 for _, gpu1 in seen]
    assert jittery == [0.0] * len(seen), jittery  # the total neither moves nor jumps by the counter
    assert all(b - a == pytest.approx(100.0 * round((b - a) / 100.0)) for a, b in zip(steady, steady[1:]))
    assert steady == sorted(steady) and steady[-1] > steady[0]
    assert sum("went back" in line and "GPU 0" in line for line in agent.stderr) == 1, "".join(agent.stderr)


def test_negative_and_nan_readings_are_missing_never_exported(
    exporter: HostileExporter, start_agent: Callable[[HostileExporter], Agent]
) -> None:
    def page(n: int) -> str:
        text = set_value(with_newline_in_hostname(PAGE), "DCGM_FI_DEV_POWER_USAGE", 1, -250.5)
        text = set_value(text, "DCGM_FI_DEV_GPU_TEMP", 2, "NaN")
        text = set_value(text, "DCGM_FI_DEV_FB_FREE", 0, -5000)
        return set_value(text, ENERGY, 3, ENERGY_MJ[3] + 1000 if n < 2 else -1000)

    exporter.page_for = page
    agent = start_agent(exporter)
    wait_for("scrapes past the negative energy", lambda: exporter.scrapes >= 6, timeout_s=20)
    wait_for("a tick after them", lambda: agent.metrics()["rackscope_agent_collection_duration_seconds"])
    metrics = agent.metrics()
    for name, series in metrics.items():
        for key, value in series.items():
            assert value >= 0 and value == value, f"{name}{{{key}}} = {value}"
    assert agent.up() == {str(i): 1.0 for i in range(4)}  # one bad field does not take a GPU down
    assert set(metrics["hw_power_watts"]) == {"0", "2", "3"}
    assert set(metrics["hw_temperature_celsius"]) == {"0", "1", "3"}
    assert "0" not in metrics["hw_gpu_memory_limit_bytes"]  # used + (negative free) is no total
    assert "3,method=counter" not in metrics["hw_energy_joules_total"]
    assert metrics["hw_energy_joules_total"]["0,method=counter"] == 0.0
    for gpu, what in ((1, "DCGM_FI_DEV_POWER_USAGE"), (2, "DCGM_FI_DEV_GPU_TEMP"), (3, ENERGY)):
        logged = [line for line in agent.stderr if f"GPU {gpu}" in line and what in line and "invalid" in line]
        assert len(logged) == 1, f"GPU {gpu} {what}: {logged}"
    # The newline in the Hostname label reached the log escaped, inside one line.
    assert not [line for line in agent.stderr if line.startswith(FORGED)]
    assert any("hgx-h100-03\\n" + FORGED in line for line in agent.stderr)
