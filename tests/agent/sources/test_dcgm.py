"""DcgmSource against a real HTTP server on 127.0.0.1 serving dcgm-exporter pages."""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rackscope.agent.cli import settings_from_args
from rackscope.agent.settings import AgentSettings, resolve
from rackscope.agent.sources import dcgm_deadline_s, open_source
from rackscope.agent.sources.base import GpuSample, GpuSource
from rackscope.agent.sources.dcgm import HINT, SHUTDOWN_DEADLINE_S, DcgmSource
from rackscope.cli import build_parser
from rackscope.clock import VirtualClock
from rackscope.errors import ConfigError, SourceError, SourceUnavailable
from tests.helpers import wait_for

DATA = Path(__file__).parent / "data"
MIB = 1024 * 1024
WALL_S = 1_750_000_000.0
NVLINK_UNIT = 1_024_000  # B/s per unit of DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL: (rx + tx KiB/s) / 1000


def recording(name: str) -> str:
    return (DATA / name).read_text()


class FakeExporter:
    """A dcgm-exporter stand-in: serves ``body`` over keep-alive HTTP/1.1; tests change it between scrapes."""

    def __init__(self, body: str, port: int = 0) -> None:
        self.body = body
        self.status = 200
        self.delay_s = 0.0
        self.trickle_s = 0.0  # > 0: the page goes out one byte per trickle_s
        self.close_connections = False
        self.gzip = False
        self.connections = 0
        self.requests = 0
        self.paths: list[str] = []
        self._sockets: set[socket.socket] = set()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                exporter.connections += 1
                exporter._sockets.add(self.connection)

            def finish(self) -> None:
                exporter._sockets.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                exporter.requests += 1
                exporter.paths.append(self.path)
                if exporter.delay_s and exporter._stop.wait(exporter.delay_s):
                    return
                data = exporter.body.encode()
                if exporter.gzip:
                    data = gzip.compress(data)
                self.send_response(exporter.status)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                if exporter.gzip:
                    self.send_header("Content-Encoding", "gzip")
                if exporter.close_connections:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if not exporter.trickle_s:
                    self.wfile.write(data)
                    return
                for position in range(len(data)):
                    if exporter._stop.wait(exporter.trickle_s):
                        return
                    try:
                        self.wfile.write(data[position : position + 1])
                    except OSError:
                        return  # the client gave up

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def drop_connections(self) -> None:
        """Close every open client connection (as an exporter's idle timeout would)."""
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def kill(self) -> None:
        """The exporter process dies: the port refuses connections and open ones are cut."""
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self.drop_connections()


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeExporter]]:
    started: list[FakeExporter] = []

    def start(body: str, port: int = 0) -> FakeExporter:
        exporter = FakeExporter(body, port)
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        if not exporter._stop.is_set():
            exporter.kill()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(100.0)


def source_for(exporter: FakeExporter, clock: VirtualClock, **kwargs: object) -> DcgmSource:
    return DcgmSource(exporter.url, clock=clock, wall_clock=lambda: WALL_S, **kwargs)  # type: ignore[arg-type]


def opened_on_l4(
    serve: Callable[..., FakeExporter], clock: VirtualClock, timeout_s: float
) -> tuple[FakeExporter, DcgmSource]:
    """The two-L4 recording served, and a source opened on it with ``timeout_s``."""
    exporter = serve(recording("l4x2_custom_no_help.prom"))
    source = source_for(exporter, clock, timeout_s=timeout_s)
    source.open()
    return exporter, source


def set_value(text: str, metric: str, gpu: int, value: object, instance: str | None = None) -> str:
    """Rewrite the value of ``metric`` on every line of GPU ``gpu`` (optionally one MIG instance)."""
    out, changed = [], 0
    for line in text.splitlines():
        if (
            line.startswith(metric + "{")
            and f'gpu="{gpu}"' in line
            and (instance is None or f'GPU_I_ID="{instance}"' in line)
        ):
            out.append(f"{line[: line.rindex('}') + 1]} {value}")
            changed += 1
        else:
            out.append(line)
    assert changed, f"no {metric} line for gpu {gpu}"
    return "\n".join(out) + "\n"


def drop_lines(text: str, *needles: str) -> str:
    out = [line for line in text.splitlines() if not all(n in line for n in needles)]
    assert len(out) < len(text.splitlines()), f"nothing matched {needles}"
    return "\n".join(out) + "\n"


def by_index(samples: list[GpuSample]) -> dict[int, GpuSample]:
    return {s.index: s for s in samples}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- identity and conversions


def test_is_a_gpu_source() -> None:
    source = DcgmSource("http://127.0.0.1:9/metrics")
    assert isinstance(source, GpuSource)
    assert source.name == "dcgm"
    assert source.simulated is False


def test_open_describes_each_gpu_of_an_exporter3_node(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    exporter = serve(recording("h100x4_exporter3.prom"))
    source = source_for(exporter, clock)
    infos = source.open()
    assert [i.index for i in infos] == [0, 1, 2, 3]
    assert infos[0].uuid == "GPU-5b4f3f8a-2c61-1e9d-7a0b-93c1d2e4f001"
    assert {i.model for i in infos} == {"NVIDIA H100 80GB HBM3"}
    # No FB_RESERVED on this exporter: total = used + free.
    assert [i.memory_total_bytes for i in infos] == [81559 * MIB] * 4
    assert {i.power_limit_w for i in infos} == {None}
    assert {i.simulated for i in infos} == {False}
    assert source.hostname == "hgx-h100-03"  # the old ``Hostname`` label
    assert source.driver_version is None
    assert source.mig_profiles == {}


def test_first_sample_converts_units_exactly(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    exporter = serve(recording("h100x4_exporter3.prom"))
    source = source_for(exporter, clock)
    source.open()
    gpu = by_index(source.sample())[0]
    assert gpu.ok
    assert gpu.error is None
    assert gpu.timestamp_s == WALL_S
    assert gpu.power_w == pytest.approx(612.871)
    assert gpu.energy_j == 0.0
    assert gpu.energy_method == "counter"
    assert gpu.memory_used_bytes == 74213 * MIB
    assert gpu.memory_total_bytes == 81559 * MIB
    assert gpu.utilization == pytest.approx(0.97)
    assert gpu.sm_clock_mhz == 1980
    assert gpu.temperature_c == 56
    assert (gpu.nvlink_tx_bytes, gpu.nvlink_rx_bytes) == (0, 0)
    assert (gpu.pcie_tx_bytes, gpu.pcie_rx_bytes) == (0, 0)
    assert (gpu.xid_errors, gpu.last_xid) == (0, 0)
    # Not exported by the default counters: unknown, not zero.
    assert gpu.power_limit_w is None
    assert gpu.throttle_reasons is None
    assert gpu.ecc_corrected is None
    assert gpu.ecc_uncorrected is None


def test_counters_accumulate_between_scrapes(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    page = recording("h100x4_exporter3.prom")
    exporter = serve(page)
    source = source_for(exporter, clock)
    source.open()
    clock.advance(2.0)
    page = set_value(page, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 0, 4318472215 + 1_234_567)
    page = set_value(page, "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", 0, 160000)
    page = set_value(page, "DCGM_FI_DEV_PCIE_TX_THROUGHPUT", 0, 20000)
    exporter.body = page
    gpus = by_index(source.sample())
    # Energy: mJ counter delta since open, in J.
    assert gpus[0].energy_j == pytest.approx(1234.567)
    assert gpus[1].energy_j == 0.0
    # NVLink total (MB/s, both directions) integrated over 2 s, half to each direction.
    assert gpus[0].nvlink_tx_bytes == (152348 + 160000) // 2 * NVLINK_UNIT // 2 * 2
    assert gpus[0].nvlink_rx_bytes == gpus[0].nvlink_tx_bytes
    assert gpus[1].nvlink_tx_bytes == 149902 * NVLINK_UNIT // 2 * 2
    # Legacy PCIe throughput is KB/s.
    assert gpus[0].pcie_tx_bytes == (19234 + 20000) // 2 * 1024 * 2
    assert gpus[0].pcie_rx_bytes == 51210 * 1024 * 2


def test_energy_counter_survives_a_driver_reload(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    page = recording("h100x4_exporter3.prom")
    exporter = serve(page)
    source = source_for(exporter, clock)
    source.open()
    energies = []
    for counter_mj in (4318472215 + 5000, 2000, 3500):  # +5 J, driver reload restarts at 2 J, +1.5 J
        clock.advance(1.0)
        exporter.body = set_value(page, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 0, counter_mj)
        energies.append(by_index(source.sample())[0].energy_j)
    assert energies == pytest.approx([5.0, 7.0, 8.5])


def test_energy_counter_stepping_back_a_little_is_jitter(
    serve: Callable[..., FakeExporter], clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    page = recording("h100x4_exporter3.prom")
    exporter = serve(page)
    source = source_for(exporter, clock)
    source.open()
    base_mj = 4318472215
    energies = []
    for counter_mj in (base_mj - 500, base_mj - 1000, base_mj + 2000, base_mj + 1500, base_mj + 5000):
        clock.advance(1.0)
        exporter.body = set_value(page, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 0, counter_mj)
        energies.append(by_index(source.sample())[0].energy_j)
    # Back 0.5 J, back 1 J: no movement (not +4.3 MJ); then only what passes the earlier reading.
    assert energies == pytest.approx([0.0, 0.0, 2.0, 2.0, 5.0])
    assert len([r for r in caplog.records if "GPU 0" in r.message and "went back" in r.message]) == 1


def test_invalid_readings_are_missing_and_logged_once(
    serve: Callable[..., FakeExporter], clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    page = recording("h100x4_exporter3.prom")
    exporter = serve(page)
    source = source_for(exporter, clock)
    source.open()
    bad = set_value(page, "DCGM_FI_DEV_POWER_USAGE", 0, -250.5)
    bad = set_value(bad, "DCGM_FI_DEV_GPU_TEMP", 1, "NaN")
    bad = set_value(bad, "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", 1, "-Inf")
    bad = set_value(bad, "DCGM_FI_DEV_FB_FREE", 2, -5000)
    bad = set_value(bad, "DCGM_FI_DEV_XID_ERRORS", 2, -13)
    bad = set_value(bad, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 3, -1000)
    exporter.body = bad
    for _ in range(3):
        clock.advance(1.0)
        gpus = by_index(source.sample())
        assert all(g.ok for g in gpus.values())  # one bad field does not take a GPU down
        assert (gpus[0].power_w, gpus[0].energy_j) == (None, 0.0)
        assert (gpus[1].temperature_c, gpus[1].nvlink_tx_bytes, gpus[1].power_w) == (None, None, 598.204)
        assert (gpus[2].memory_total_bytes, gpus[2].memory_used_bytes) == (None, 74221 * MIB)
        assert (gpus[2].xid_errors, gpus[2].last_xid) == (None, None)
        assert (gpus[3].energy_j, gpus[3].power_w) == (None, 587.993)
    for gpu, what in ((0, "POWER_USAGE"), (1, "GPU_TEMP"), (1, "NVLINK_BANDWIDTH_TOTAL"), (2, "FB_FREE"), (2, "XID")):
        logged = [r for r in caplog.records if f"GPU {gpu}: invalid reading" in r.message and what in r.message]
        assert len(logged) == 1, (gpu, what, [r.message for r in caplog.records])
    assert len([r for r in caplog.records if "GPU 3" in r.message and "invalid reading -1000" in r.message]) == 1

    # Valid again: the energy counter carries on from where it was, the NVLink integral too.
    exporter.body = set_value(page, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 3, 4263350612 + 7000)
    clock.advance(1.0)
    gpus = by_index(source.sample())
    assert gpus[3].energy_j == pytest.approx(7.0)
    assert gpus[2].memory_total_bytes is not None and gpus[1].temperature_c == 54


def test_newer_exporter_with_profiling_fields(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    page = recording("h200x8_exporter4_prof.prom")
    exporter = serve(page)
    source = source_for(exporter, clock)
    infos = source.open()
    assert len(infos) == 8
    assert infos[0].memory_total_bytes == 143771 * MIB  # used + free + reserved
    assert infos[0].power_limit_w == 700
    assert source.hostname == "hgx-h200-11"  # the 2026 ``hostname`` label
    assert source.driver_version == "570.133.20"

    clock.advance(0.5)
    exporter.body = set_value(page, "DCGM_FI_PROF_NVLINK_TX_BYTES", 0, 101_000_000_000)
    first = by_index(source.sample())
    clock.advance(0.5)
    second = by_index(source.sample())
    # Profiling NVLink rates (B/s) integrated with the trapezoidal rule; BANDWIDTH_TOTAL is not used.
    assert first[0].nvlink_tx_bytes == int((100883421107 + 101_000_000_000) / 2 * 0.5)
    assert second[0].nvlink_tx_bytes == int((100883421107 + 101_000_000_000) / 2 * 0.5 + 101_000_000_000 * 0.5)
    assert second[0].nvlink_rx_bytes == 100893544012
    assert second[1].pcie_tx_bytes == 20998311
    assert second[1].pcie_rx_bytes == 57912370
    assert second[0].memory_used_bytes == 128455 * MIB
    assert second[4].throttle_reasons == 4  # SW power cap
    assert second[0].throttle_reasons == 0
    assert (second[3].ecc_corrected, second[3].ecc_uncorrected) == (2, 0)
    assert second[4].power_w == pytest.approx(700.002)
    assert second[4].energy_j == 0.0


def test_missing_fields_are_none_and_energy_is_integrated(
    serve: Callable[..., FakeExporter], clock: VirtualClock
) -> None:
    page = recording("l4x2_custom_no_help.prom")  # no HELP/TYPE lines, no energy counter
    exporter = serve(page)
    source = source_for(exporter, clock)
    infos = source.open()
    assert infos[0].memory_total_bytes == (19482 + 3021) * MIB
    assert infos[0].power_limit_w is None
    clock.advance(2.0)
    exporter.body = set_value(page, "DCGM_FI_DEV_POWER_USAGE", 0, "80.125000")
    gpus = by_index(source.sample())
    assert gpus[0].energy_method == "integrated"
    assert gpus[0].energy_j == pytest.approx((70.125 + 80.125) / 2 * 2.0)
    assert gpus[1].energy_j == pytest.approx(52.5 * 2.0)
    assert gpus[0].temperature_c is None  # DCGM's blank sentinel, not 9.2e18 degrees
    assert gpus[1].temperature_c == 63
    for gpu in gpus.values():
        assert gpu.ok
        assert gpu.nvlink_tx_bytes is None
        assert gpu.nvlink_rx_bytes is None
        assert gpu.pcie_tx_bytes is None
        assert gpu.pcie_rx_bytes is None
        assert gpu.xid_errors is None
        assert gpu.last_xid is None
        assert gpu.ecc_corrected is None
        assert gpu.ecc_uncorrected is None
        assert gpu.throttle_reasons is None
        assert gpu.power_limit_w is None
    assert gpus[1].utilization == pytest.approx(0.41)


def test_help_and_type_lines_change_nothing(serve: Callable[..., FakeExporter]) -> None:
    with_meta = recording("h100x4_exporter3.prom")
    without_meta = "\n".join(line for line in with_meta.splitlines() if not line.startswith("#")) + "\n"
    results = []
    for page in (with_meta, without_meta):
        clock = VirtualClock(0.0)
        exporter = serve(page)
        source = source_for(exporter, clock)
        infos = source.open()
        clock.advance(1.0)
        results.append((infos, source.sample()))
    assert results[0] == results[1]
    assert results[0][1][0].nvlink_tx_bytes == 152348 * NVLINK_UNIT // 2


def test_mig_takes_device_fields_once_and_sums_instance_memory(
    serve: Callable[..., FakeExporter], clock: VirtualClock
) -> None:
    page = recording("a100x2_mig.prom")
    exporter = serve(page)
    source = source_for(exporter, clock)
    infos = source.open()
    assert [i.index for i in infos] == [0, 1]
    # Instances partition the framebuffer: used + free + reserved summed over the GPU's instances.
    assert infos[0].memory_total_bytes == ((31211 + 8709) + (15003 + 4989) + (2117 + 7699)) * MIB
    assert infos[1].memory_total_bytes == (70112 + 11022) * MIB
    assert source.mig_profiles == {0: {"1": "3g.40gb", "2": "2g.20gb", "3": "1g.10gb"}, 1: {"0": "7g.80gb"}}
    assert source.driver_version == "535.154.05"

    clock.advance(1.0)
    for instance in ("1", "2", "3"):  # the device-wide counter is repeated on every instance line
        page = set_value(page, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 0, 20938271554 + 300_000, instance)
    exporter.body = page
    gpus = by_index(source.sample())
    assert gpus[0].power_w == pytest.approx(287.514)  # not 3 x
    assert gpus[0].energy_j == pytest.approx(300.0)  # not 900
    assert gpus[0].memory_used_bytes == (31211 + 15003 + 2117) * MIB
    assert gpus[1].memory_used_bytes == 70112 * MIB
    assert gpus[0].sm_clock_mhz == 1410
    assert gpus[0].utilization is None  # DCGM reports 0 for MIG instances: unknown, not idle
    assert (gpus[0].nvlink_tx_bytes, gpus[0].xid_errors) == (0, 0)

    # One instance without framebuffer lines: no partial sum.
    exporter.body = drop_lines(page, "DCGM_FI_DEV_FB_USED{", 'gpu="0"', 'GPU_I_ID="3"')
    gpus = by_index(source.sample())
    assert gpus[0].memory_used_bytes is None
    assert gpus[0].memory_total_bytes is None
    assert gpus[1].memory_used_bytes == 70112 * MIB


def test_kubernetes_labels_and_shared_gpus_are_not_double_counted(
    serve: Callable[..., FakeExporter], clock: VirtualClock
) -> None:
    page = recording("h100x4_kubernetes.prom")
    exporter = serve(page)
    source = source_for(exporter, clock)
    infos = source.open()
    assert [i.index for i in infos] == [0, 1, 2, 3]
    assert infos[2].memory_total_bytes == 81559 * MIB
    assert source.hostname == "gpu-worker-2"
    clock.advance(1.0)
    exporter.body = set_value(page, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 2, 3120095513 + 1000)  # both pods' lines
    gpus = by_index(source.sample())
    assert gpus[2].power_w == pytest.approx(211.93)  # one line per pod, same GPU
    assert gpus[2].energy_j == pytest.approx(1.0)
    assert gpus[2].memory_used_bytes == 20411 * MIB
    assert gpus[2].utilization == pytest.approx(0.37)
    assert gpus[3].power_w == pytest.approx(69.437)  # no pod at all
    assert gpus[0].nvlink_tx_bytes == 148211 * NVLINK_UNIT // 2


def test_xid_counted_once_per_change(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    page = recording("h100x4_exporter3.prom")
    exporter = serve(page)
    source = source_for(exporter, clock)
    source.open()
    seen = []
    for xid in (0, 79, 79, 79, 48, 0, 48, 13):
        clock.advance(1.0)
        exporter.body = set_value(page, "DCGM_FI_DEV_XID_ERRORS", 1, xid)
        gpus = by_index(source.sample())
        seen.append((gpus[1].xid_errors, gpus[1].last_xid))
        assert gpus[0].xid_errors == 0
    assert seen == [(0, 0), (1, 79), (1, 79), (1, 79), (2, 48), (2, 0), (3, 48), (4, 13)]


def test_impossible_utilization_is_none(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    exporter = serve(set_value(recording("h100x4_exporter3.prom"), "DCGM_FI_DEV_GPU_UTIL", 0, 4294967295))
    source = source_for(exporter, clock)
    source.open()
    gpus = by_index(source.sample())
    assert gpus[0].utilization is None
    assert gpus[1].utilization == pytest.approx(0.96)


# --------------------------------------------------------------------------- failures at open


def test_unreachable_exporter_at_open_gives_a_hint() -> None:
    port = closed_port()
    source = DcgmSource(f"http://127.0.0.1:{port}/metrics", timeout_s=0.5)
    with pytest.raises(SourceUnavailable) as info:
        source.open()
    assert info.value.hint == HINT
    assert "--dcgm-url" in str(info.value)
    assert "--source sim" in str(info.value)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert source.is_available() is False


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (500, "An error has occurred while serving metrics:\n\ncollection failed\n", "HTTP 500"),
        (200, "<html><body><h1>502 Bad Gateway</h1></body></html>\n", "Prometheus text format"),
        (200, "# HELP node_load1 1m load average.\n# TYPE node_load1 gauge\nnode_load1 0.52\n", "no DCGM_FI_"),
        (200, "", "no DCGM_FI_"),
    ],
)
def test_bad_answers_at_open(serve: Callable[..., FakeExporter], status: int, body: str, message: str) -> None:
    exporter = serve(body)
    exporter.status = status
    source = DcgmSource(exporter.url)
    with pytest.raises(SourceUnavailable, match=message) as info:
        source.open()
    assert info.value.hint == HINT
    assert source.is_available() is False


@pytest.mark.parametrize("url", ["localhost:9400/metrics", "ftp://127.0.0.1/metrics", "http://127.0.0.1:x/metrics"])
def test_bad_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="--dcgm-url"):
        DcgmSource(url)


def test_bad_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        DcgmSource(timeout_s=0)


def test_url_without_path_scrapes_metrics(serve: Callable[..., FakeExporter]) -> None:
    exporter = serve(recording("l4x2_custom_no_help.prom"))
    source = DcgmSource(f"http://127.0.0.1:{exporter.port}")
    assert source.is_available() is True
    assert exporter.paths == ["/metrics"]


def test_sample_needs_open(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    exporter = serve(recording("l4x2_custom_no_help.prom"))
    source = source_for(exporter, clock)
    with pytest.raises(SourceError):
        source.sample()
    source.open()
    source.close()
    with pytest.raises(SourceError):
        source.sample()
    source.close()  # twice is fine


# --------------------------------------------------------------------------- failures mid-run


def test_exporter_dying_mid_run_marks_samples_then_recovers(
    serve: Callable[..., FakeExporter], clock: VirtualClock
) -> None:
    page = recording("h100x4_exporter3.prom")
    exporter = serve(page)
    source = source_for(exporter, clock, timeout_s=1.0)
    source.open()
    clock.advance(1.0)
    assert all(s.ok for s in source.sample())

    exporter.kill()
    clock.advance(1.0)
    down = source.sample()
    assert [s.index for s in down] == [0, 1, 2, 3]
    assert not any(s.ok for s in down)
    assert all(s.error and "cannot connect" in s.error and exporter.url in s.error for s in down)
    assert all(s.power_w is None and s.energy_j is None for s in down)

    serve(set_value(page, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 0, 4318472215 + 10_000), port=exporter.port)
    clock.advance(1.0)
    back = by_index(source.sample())
    assert all(s.ok for s in back.values())
    assert back[0].energy_j == pytest.approx(10.0)  # the counter bridges the outage
    assert back[1].nvlink_tx_bytes == 149902 * NVLINK_UNIT // 2 * 3  # 3 s of a steady rate, outage included


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (500, "An error has occurred while serving metrics\n", "HTTP 500"),
        (503, "", "HTTP 503"),
        (200, "\x00\x01\x02 not metrics at all", "Prometheus text format"),
    ],
)
def test_bad_answer_mid_run_then_recovery(
    serve: Callable[..., FakeExporter], clock: VirtualClock, status: int, body: str, message: str
) -> None:
    page = recording("h200x8_exporter4_prof.prom")
    exporter = serve(page)
    source = source_for(exporter, clock)
    source.open()
    exporter.status, exporter.body = status, body
    clock.advance(1.0)
    failed = source.sample()
    assert len(failed) == 8
    assert all(not s.ok and s.error and message in s.error for s in failed)
    exporter.status, exporter.body = 200, page
    clock.advance(1.0)
    assert all(s.ok and s.error is None for s in source.sample())


def test_hung_exporter_times_out(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    exporter, source = opened_on_l4(serve, clock, timeout_s=0.2)
    exporter.delay_s = 30.0
    started = time.monotonic()
    samples = source.sample()
    assert time.monotonic() - started < 5.0
    assert all(not s.ok and s.error and "did not answer within 0.2 s" in s.error for s in samples)
    exporter.delay_s = 0.0
    assert all(s.ok for s in source.sample())


@pytest.mark.slow
def test_a_trickling_exporter_fails_the_scrape_at_its_deadline(
    serve: Callable[..., FakeExporter], clock: VirtualClock
) -> None:
    # Each byte arrives well within any per-read timeout; the whole scrape never would.
    exporter, source = opened_on_l4(serve, clock, timeout_s=0.5)
    exporter.trickle_s = 0.05
    started = time.monotonic()
    samples = source.sample()
    assert time.monotonic() - started < 0.5 + 0.4
    assert all(not s.ok and s.error and "did not finish answering within 0.5 s" in s.error for s in samples)
    assert all(s.power_w is None and s.energy_j is None for s in samples)
    exporter.trickle_s = 0.0
    assert all(s.ok for s in source.sample())


def test_interrupt_ends_a_scrape_in_flight(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    exporter, source = opened_on_l4(serve, clock, timeout_s=30.0)
    exporter.delay_s = 60.0
    result: list[list[GpuSample]] = []
    worker = threading.Thread(target=lambda: result.append(source.sample()))
    worker.start()
    wait_for("the scrape to reach the exporter", lambda: exporter.requests == 2)
    started = time.monotonic()
    source.interrupt()
    worker.join(5.0)
    assert time.monotonic() - started < 0.5
    assert all(not s.ok and s.error and "stopped" in s.error for s in result[0])
    # Shutting down, an exporter that just failed is not waited on again.
    exporter.delay_s = 0.0
    started = time.monotonic()
    assert not any(s.ok for s in source.sample())
    assert time.monotonic() - started < 0.1
    assert exporter.requests == 2
    source.close()
    source.close()


@pytest.mark.slow
def test_after_interrupt_a_healthy_exporter_still_gives_a_last_sample(
    serve: Callable[..., FakeExporter], clock: VirtualClock
) -> None:
    exporter, source = opened_on_l4(serve, clock, timeout_s=30.0)
    source.interrupt()
    assert all(s.ok for s in source.sample())
    exporter.delay_s = 60.0
    started = time.monotonic()
    assert not any(s.ok for s in source.sample())
    assert SHUTDOWN_DEADLINE_S <= time.monotonic() - started < SHUTDOWN_DEADLINE_S + 0.4


@pytest.mark.parametrize("gzipped", [False, True])
def test_a_page_over_the_size_cap_is_refused(
    serve: Callable[..., FakeExporter], clock: VirtualClock, gzipped: bool
) -> None:
    page = recording("h100x4_exporter3.prom")
    exporter = serve(page)
    source = source_for(exporter, clock, max_bytes=len(page.encode()))
    source.open()
    exporter.gzip = gzipped
    exporter.body = page + "# one more line than the cap allows\n"
    samples = source.sample()
    assert all(not s.ok and s.error and f"more than {len(page.encode())} bytes" in s.error for s in samples)
    exporter.body = page
    assert all(s.ok for s in source.sample())


def test_gpu_missing_from_the_page(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    page = recording("h100x4_exporter3.prom")
    exporter = serve(page)
    source = source_for(exporter, clock)
    source.open()
    exporter.body = drop_lines(page, 'gpu="3"')
    gpus = by_index(source.sample())
    assert [g.ok for g in gpus.values()] == [True, True, True, False]
    assert gpus[3].error
    assert "GPU 3" in gpus[3].error
    exporter.body = page
    assert all(s.ok for s in source.sample())


def test_gpu_appearing_after_start_is_ignored(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    page = recording("l4x2_custom_no_help.prom")
    exporter = serve(page)
    source = source_for(exporter, clock)
    source.open()
    extra = [line.replace('gpu="1"', 'gpu="2"') for line in page.splitlines() if 'gpu="1"' in line]
    exporter.body = page + "\n".join(extra) + "\n"
    assert [s.index for s in source.sample()] == [0, 1]


# --------------------------------------------------------------------------- HTTP behaviour


def test_one_fresh_connection_per_scrape(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    # No connection outlives its scrape: nothing a misbehaving exporter left on one (a half-read
    # answer, a stalled stream) can reach the next scrape.
    exporter = serve(recording("h200x8_exporter4_prof.prom"))
    source = source_for(exporter, clock)
    source.open()
    for _ in range(3):
        assert all(s.ok for s in source.sample())
    exporter.close_connections = True
    assert all(s.ok for s in source.sample())
    assert (exporter.connections, exporter.requests) == (5, 5)
    source.close()


def test_gzip_body(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    exporter = serve(recording("l4x2_custom_no_help.prom"))
    exporter.gzip = True
    source = source_for(exporter, clock)
    assert [i.model for i in source.open()] == ["NVIDIA L4", "NVIDIA L4"]


def test_accepts_a_monotonic_callable(serve: Callable[..., FakeExporter]) -> None:
    exporter = serve(recording("l4x2_custom_no_help.prom"))
    ticks = iter([10.0, 14.0])
    source = DcgmSource(exporter.url, clock=lambda: next(ticks))
    source.open()
    assert by_index(source.sample())[1].energy_j == pytest.approx(52.5 * 4.0)


# --------------------------------------------------------------------------- the agent's settings


@pytest.mark.parametrize(
    ("timeout_s", "interval_s", "deadline_s"), [(2.0, 1.0, 0.9), (2.0, 5.0, 2.0), (0.3, 1.0, 0.3), (2.0, 0.1, 0.09)]
)
def test_a_scrape_gets_the_timeout_capped_below_the_interval(
    timeout_s: float, interval_s: float, deadline_s: float
) -> None:
    settings = AgentSettings(source="dcgm", node="n1", dcgm_timeout_s=timeout_s, interval_s=interval_s).validate()
    assert dcgm_deadline_s(settings) == pytest.approx(deadline_s)


def test_the_scrape_timeout_comes_from_the_flag_then_the_environment() -> None:
    env = {"RACKSCOPE_DCGM_TIMEOUT": "0.7", "RACKSCOPE_NODE": "n1"}
    assert resolve({"dcgm_timeout_s": 0.4}, env).dcgm_timeout_s == 0.4
    assert resolve({}, env).dcgm_timeout_s == 0.7
    assert resolve({}, {"RACKSCOPE_NODE": "n1"}).dcgm_timeout_s == 2.0
    with pytest.raises(ConfigError, match="--dcgm-timeout"):
        resolve({}, {**env, "RACKSCOPE_DCGM_TIMEOUT": "0"})
    args = build_parser().parse_args(["agent", "--source", "dcgm", "--dcgm-timeout", "0.25", "--node", "n1"])
    assert settings_from_args(args, env={}).dcgm_timeout_s == 0.25


@pytest.mark.slow
def test_the_agent_source_uses_that_deadline(serve: Callable[..., FakeExporter]) -> None:
    exporter = serve(recording("l4x2_custom_no_help.prom"))
    settings = AgentSettings(source="dcgm", node="n1", dcgm_url=exporter.url, interval_s=0.5).validate()
    source, infos, sim_gpus = open_source(settings, VirtualClock())
    assert (len(infos), sim_gpus) == (2, None)
    exporter.trickle_s = 0.05
    samples = source.sample()
    assert all(not s.ok and s.error and "within 0.45 s" in s.error for s in samples)
    source.close()


# --------------------------------------------------------------------------- NVLink


def with_link_errors(page: str, gpu: int, flit: int, data: int, replay: int, recovery: int) -> str:
    """``page`` plus the four NVLink error totals of GPU ``gpu``, labelled like its power line."""
    power = next(
        line for line in page.splitlines() if line.startswith("DCGM_FI_DEV_POWER_USAGE{") and f'gpu="{gpu}"' in line
    )
    labels = power[power.index("{") : power.rindex("}") + 1]
    values = {"CRC_FLIT": flit, "CRC_DATA": data, "REPLAY": replay, "RECOVERY": recovery}
    lines = [f"DCGM_FI_DEV_NVLINK_{what}_ERROR_COUNT_TOTAL{labels} {value}" for what, value in values.items()]
    return page + "\n".join(lines) + "\n"


def test_nvlink_bandwidth_total_counts_1024000_bytes_per_second_per_unit(
    serve: Callable[..., FakeExporter], clock: VirtualClock
) -> None:
    exporter = serve(recording("h100x4_exporter3.prom"))  # no per-direction fields: the total, split
    source = source_for(exporter, clock)
    source.open()
    clock.advance(1.0)
    gpus = by_index(source.sample())
    # 152348 units x 1,024,000 B/s for 1 s, half to each direction.
    assert (gpus[0].nvlink_tx_bytes, gpus[0].nvlink_rx_bytes) == (78_002_176_000, 78_002_176_000)


def test_per_direction_fields_win_over_the_total_and_nothing_is_split(
    serve: Callable[..., FakeExporter], clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = serve(recording("h200x8_exporter4_prof.prom"))  # sends the total too
    source = source_for(exporter, clock)
    source.open()
    clock.advance(2.0)
    gpus = by_index(source.sample())
    assert (gpus[0].nvlink_tx_bytes, gpus[0].nvlink_rx_bytes) == (100883421107 * 2, 100893544012 * 2)
    assert not [r for r in caplog.records if "splitting" in r.message]


def test_nvlink_error_totals_become_counters_by_type(serve: Callable[..., FakeExporter], clock: VirtualClock) -> None:
    page = recording("h200x8_exporter4_prof.prom")
    exporter = serve(with_link_errors(with_link_errors(page, 0, 12, 3, 7, 1), 1, 0, 0, 0, 0))
    source = source_for(exporter, clock)
    source.open()
    clock.advance(1.0)
    gpus = by_index(source.sample())
    # Totals since driver load, like the ECC totals; flit and data CRC errors add up.
    assert (gpus[0].nvlink_crc_errors, gpus[0].nvlink_replay_errors, gpus[0].nvlink_recovery_errors) == (15, 7, 1)
    assert (gpus[1].nvlink_crc_errors, gpus[1].nvlink_replay_errors, gpus[1].nvlink_recovery_errors) == (0, 0, 0)
    assert (gpus[2].nvlink_crc_errors, gpus[2].nvlink_replay_errors, gpus[2].nvlink_recovery_errors) == (
        None,
        None,
        None,
    )

    exporter.body = with_link_errors(with_link_errors(page, 0, 40, 3, 19, 2), 1, 0, 0, 0, 0)
    clock.advance(1.0)
    gpus = by_index(source.sample())
    assert (gpus[0].nvlink_crc_errors, gpus[0].nvlink_replay_errors, gpus[0].nvlink_recovery_errors) == (43, 19, 2)
    assert gpus[1].nvlink_crc_errors == 0


def test_expected_fields_missing_from_the_page_are_named_once_with_the_counters_file(
    serve: Callable[..., FakeExporter], clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = serve(recording("h200x8_exporter4_prof.prom"))  # everything but the NVLink error totals
    source = source_for(exporter, clock)
    source.open()
    clock.advance(1.0)
    source.sample()
    source.open()  # reopened on the same page: still one line
    warned = [r.getMessage() for r in caplog.records if "does not send" in r.getMessage()]
    assert len(warned) == 1
    missing = warned[0].split("does not send ")[1].split(";")[0].split(", ")
    assert missing == [
        "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
        "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL",
        "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
        "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
    ]
    assert "deploy/dcgm/rackscope-counters.csv" in warned[0]


def test_a_page_with_every_expected_field_warns_of_nothing_missing(
    serve: Callable[..., FakeExporter], clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    page = recording("h200x8_exporter4_prof.prom")
    exporter = serve(with_link_errors(page, 0, 0, 0, 0, 0))  # on one GPU is enough to tell it is enabled
    source_for(exporter, clock).open()
    assert not [r for r in caplog.records if "does not send" in r.getMessage()]


def test_a_default_counters_page_names_what_it_lacks(
    serve: Callable[..., FakeExporter], clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = serve(recording("l4x2_custom_no_help.prom"))
    source_for(exporter, clock).open()
    (warned,) = [r.getMessage() for r in caplog.records if "does not send" in r.getMessage()]
    for name in (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
        "DCGM_FI_PROF_NVLINK_TX_BYTES",
    ):
        assert name in warned
    assert "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS" not in warned  # the older alias is not asked for separately
