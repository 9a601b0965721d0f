"""CPU cost of the agent against a bare OpenTelemetry + Prometheus-exporter baseline.

For each GPU count, three processes run side by side while a fourth scrapes both /metrics
endpoints every second, the way Prometheus does (same Accept header, gzip):

- agent: ``rackscope agent --source sim --gpus N --interval 1 --metrics-port 0 --api-port P``
  (the whole agent: sampler, telemetry, /metrics, control API on a free port P). ``--agent telemetry`` runs
  only the telemetry pipeline and the metrics server around the simulated source instead.
- baseline: the OpenTelemetry SDK with ``opentelemetry-exporter-prometheus``'s
  PrometheusMetricReader and prometheus_client's HTTP server, serving the same GPU series
  (same metrics, same attribute sets) from trivial observable callbacks.

CPU is read from ``/proc/<pid>/stat`` (utime + stime, all threads) at the start and end of
the measured window, after a warm-up. The figure is CPU seconds per wall second, in percent
of one core. The machine is shared, so the ratio agent / baseline (measured in the same run)
is the number to read; the goal is a ratio of at most 0.5.

    python benchmarks/agent_overhead.py                 # 8 and 72 GPUs, 30 s each
    python benchmarks/agent_overhead.py --gpus 8 --duration 20
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rackscope.contract import MetricDef

REPO = Path(__file__).resolve().parent.parent
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# What Prometheus 2.x sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
READY_TIMEOUT_S = 60.0


# --- measuring ---------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, dead ones included), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # fields 14 and 15 of stat(5)


def fetch(port: int) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        return response.read()
    finally:
        conn.close()


def count_series(text: str, prefixes: tuple[str, ...] = ("hw_", "rackscope_gpu_")) -> int:
    return sum(1 for line in text.splitlines() if line.startswith(prefixes))


# --- the processes ------------------------------------------------------------------------
def gpu_series(n_gpus: int) -> list[tuple[MetricDef, list[tuple[dict[str, str], float]]]]:
    """Per GPU metric: (metric, [(attributes, value)]) for every series a simulated node
    actually reports (fields the simulator leaves None are left out, as the agent does)."""
    from rackscope import __version__
    from rackscope.agent.sources.sim import SimSource
    from rackscope.agent.telemetry.series import NodeIdentity, gpu_attributes, series_by_metric
    from rackscope.clock import WallClock
    from rackscope.simgpu import make_node_gpus

    source = SimSource(make_node_gpus("gb300", n_gpus, WallClock(), "bench", "n01"))
    infos = source.open()
    samples = source.sample()
    identity = NodeIdentity("bench", "n01", "sim", True, "gb300", __version__)
    out = []
    for metric, series in series_by_metric():
        points = []
        for info, sample in zip(infos, samples, strict=True):
            for s in series:
                value = s.value(sample, info)
                if value is not None:
                    points.append((dict(gpu_attributes(identity, info) + s.extra), float(value)))
        out.append((metric, points))
    return out


def serve_baseline(n_gpus: int) -> int:
    """The bare baseline: OTel SDK + Prometheus exporter, trivial observable callbacks."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    from rackscope.contract import Kind

    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("baseline")
    Points = list[tuple[dict[str, str], float]]
    for metric, points in gpu_series(n_gpus):
        def callback(_options: CallbackOptions, points: Points = points) -> list[Observation]:
            return [Observation(value, attrs) for attrs, value in points]

        create = {
            Kind.GAUGE: meter.create_observable_gauge,
            Kind.COUNTER: meter.create_observable_counter,
            Kind.UPDOWNCOUNTER: meter.create_observable_up_down_counter,
        }[metric.kind]
        create(metric.otel_name, [callback], metric.unit, metric.description)
    server, _thread = start_http_server(0, addr="127.0.0.1")
    print(f"ready metrics_port={server.server_port}", file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    return 0


def serve_telemetry_only(n_gpus: int) -> int:
    """Telemetry + metrics server + a 1 s sampler over the simulated source (no control API)."""
    import asyncio

    from rackscope import __version__
    from rackscope.agent.settings import AgentSettings
    from rackscope.agent.sources.sim import SimSource
    from rackscope.agent.telemetry import Telemetry
    from rackscope.clock import WallClock
    from rackscope.simgpu import make_node_gpus

    async def main() -> None:
        settings = AgentSettings(rack="bench", node="n01", metrics_port=0, api_port=0)
        source = SimSource(make_node_gpus("gb300", n_gpus, WallClock(), "bench", "n01"))
        infos = source.open()
        telemetry = Telemetry({"rack": "bench", "node": "n01", "source": "sim", "simulated": True,
                               "gpu_model": "gb300", "version": __version__}, settings)
        telemetry.start()
        port = await telemetry.serve()
        print(f"ready metrics_port={port}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        next_t = time.monotonic()
        while not stop.is_set():
            started = time.perf_counter()
            samples = source.sample()
            telemetry.update(infos, samples, time.perf_counter() - started, 0)
            next_t += settings.interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_t - time.monotonic()))
        await telemetry.close()
        telemetry.shutdown(1.0)

    asyncio.run(main())
    return 0


def scrape(ports: list[int], duration_s: float, interval_s: float) -> int:
    """Scrapes every port each interval like Prometheus; prints a JSON summary at the end."""
    conns = {p: http.client.HTTPConnection("127.0.0.1", p, timeout=10) for p in ports}
    ok = dict.fromkeys(ports, 0)
    failed = dict.fromkeys(ports, 0)
    size = dict.fromkeys(ports, 0)
    headers = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
    end = time.monotonic() + duration_s
    next_t = time.monotonic()
    while time.monotonic() < end:
        for port, conn in conns.items():
            try:
                conn.request("GET", "/metrics", headers=headers)
                response = conn.getresponse()
                body = response.read()
                if response.getheader("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if response.status == 200:
                    ok[port] += 1
                    size[port] = len(body)
                else:
                    failed[port] += 1
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException):
                failed[port] += 1
                conn.close()
        next_t += interval_s
        time.sleep(max(0.0, next_t - time.monotonic()))
    print(json.dumps({"ok": ok, "failed": failed, "bytes": size}), flush=True)
    return 0


# --- orchestration ------------------------------------------------------------------------
class Proc:
    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log, cwd=REPO, env=env)
        self.port = 0

    def wait_ready(self) -> int:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text(errors="replace")
            found = re.search(r"ready metrics_port=(\d+)", text)
            if found:
                self.port = int(found.group(1))
                return self.port
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{text[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready in {READY_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_argv(mode: str, n_gpus: int, api: bool = True) -> list[str]:
    if mode == "cli":
        # A real API port: the control API (uvicorn) is part of what the agent costs.
        return [sys.executable, "-m", "rackscope", "--log-level", "warning", "agent", "--source", "sim",
                "--gpus", str(n_gpus), "--interval", "1", "--metrics-port", "0",
                "--api-port", str(free_port() if api else 0), "--rack", "bench", "--node", "n01"]
    return [sys.executable, __file__, "--serve-telemetry", str(n_gpus)]


def cli_available() -> bool:
    try:
        result = subprocess.run([sys.executable, "-m", "rackscope", "agent", "--help"], capture_output=True,
                                cwd=REPO, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and b"--gpus" in result.stdout


def measure(gpu_counts: list[int], duration_s: float, warmup_s: float, mode: str, api: bool) -> list[dict[str, float]]:
    procs: dict[tuple[str, int], Proc] = {}
    scraper: subprocess.Popen[bytes] | None = None
    try:
        for n in gpu_counts:
            procs[("agent", n)] = Proc(f"agent{n}", agent_argv(mode, n, api))
            procs[("baseline", n)] = Proc(f"baseline{n}", [sys.executable, __file__, "--serve-baseline", str(n)])
        ports = [p.wait_ready() for p in procs.values()]
        series = {key: count_series(fetch(p.port).decode()) for key, p in procs.items()}
        scrape_argv = [sys.executable, __file__, "--scrape", ",".join(map(str, ports)),
                       "--scrape-for", str(warmup_s + duration_s)]
        scraper = subprocess.Popen(scrape_argv, stdout=subprocess.PIPE, cwd=REPO)
        time.sleep(warmup_s)
        start = {key: cpu_seconds(p.popen.pid) for key, p in procs.items()}
        t0 = time.monotonic()
        time.sleep(duration_s)
        elapsed = time.monotonic() - t0
        end = {key: cpu_seconds(p.popen.pid) for key, p in procs.items()}
        out, _ = scraper.communicate(timeout=60)
        summary = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        if scraper is not None and scraper.poll() is None:
            scraper.kill()
        for p in procs.values():
            p.stop()
    rows = []
    for n in gpu_counts:
        agent = (end[("agent", n)] - start[("agent", n)]) / elapsed * 100.0
        base = (end[("baseline", n)] - start[("baseline", n)]) / elapsed * 100.0
        agent_port, base_port = str(procs[("agent", n)].port), str(procs[("baseline", n)].port)
        rows.append({
            "gpus": n, "agent_pct": agent, "baseline_pct": base, "ratio": agent / base if base else float("inf"),
            "agent_series": series[("agent", n)], "baseline_series": series[("baseline", n)],
            "agent_scrapes": summary["ok"][agent_port], "baseline_scrapes": summary["ok"][base_port],
            "failed_scrapes": summary["failed"][agent_port] + summary["failed"][base_port],
            "agent_bytes": summary["bytes"][agent_port], "baseline_bytes": summary["bytes"][base_port],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 72], help="GPU counts (default: 8 72)")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds (default: 30)")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds before measuring (default: 8)")
    parser.add_argument("--agent", choices=["auto", "cli", "telemetry"], default="auto",
                        help="whole agent (cli) or telemetry + metrics server only (default: cli when available)")
    parser.add_argument("--no-api", action="store_true", help="run the whole agent with its control API off")
    parser.add_argument("--serve-baseline", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-telemetry", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scrape", help=argparse.SUPPRESS)
    parser.add_argument("--scrape-for", type=float, default=30.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline:
        return serve_baseline(args.serve_baseline)
    if args.serve_telemetry:
        return serve_telemetry_only(args.serve_telemetry)
    if args.scrape:
        return scrape([int(p) for p in args.scrape.split(",")], args.scrape_for, 1.0)

    mode = args.agent
    if mode == "auto":
        mode = "cli" if cli_available() else "telemetry"
    what = "telemetry pipeline + metrics server"
    if mode == "cli":
        what = "rackscope agent (whole agent" + (", control API off)" if args.no_api else ")")
    print(f"agent: {what}; baseline: OTel SDK + PrometheusMetricReader + prometheus_client server")
    print(f"1 s sampling, both endpoints scraped every 1 s (gzip); {args.duration:.0f} s measured per run\n")
    rows = measure(args.gpus, args.duration, args.warmup, mode, not args.no_api)
    print(f"{'GPUs':>5} {'series':>13} {'agent %core':>12} {'baseline %core':>15} {'ratio':>7} {'goal':>6}  scrapes")
    for r in rows:
        verdict = "ok" if r["ratio"] <= 0.5 else "MISS"
        print(f"{r['gpus']:>5} {r['agent_series']:>6}/{r['baseline_series']:<6} {r['agent_pct']:>12.2f} "
              f"{r['baseline_pct']:>15.2f} {r['ratio']:>7.2f} {verdict:>6}  "
              f"{r['agent_scrapes']}/{r['baseline_scrapes']} ok, {r['failed_scrapes']} failed")
    print("\nratio = agent CPU / baseline CPU in the same run; goal <= 0.5. Series: GPU series served "
          "(agent/baseline). %core: CPU seconds per wall second x 100, from /proc/<pid>/stat.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
