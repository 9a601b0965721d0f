"""The agent's telemetry facade: takes each tick's GPU samples, serves them (and the
workload metrics) as Prometheus text, and pushes everything over OTLP when configured.

Two paths, one set of names (``rackscope.contract``):
- pull: GPU and agent-health series are rendered straight from the latest samples, once per
  tick, and cached; workload series (recorded by the runner into ``meter``) are collected
  from the agent's MeterProvider by an in-process reader at the same moment.
- push: with an OTLP endpoint, the same MeterProvider gets a periodic OTLP reader, and GPU
  series become observable instruments reading the latest samples.

Histograms recorded often (the runner's GenAI latencies, several per request) are aggregated
outside the SDK in a ``rackscope.histograms`` registry attached to the workload meter; both
readers add its families to every collection (``merge``), as the SDK's own data, so the two
paths carry them exactly as they carry SDK instruments.

One MeterProvider per agent and no global OpenTelemetry state, so several agents can live in
one process (the rack demo).
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence

from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from rackscope import contract
from rackscope.agent.settings import AgentSettings
from rackscope.agent.sources.base import GpuInfo, GpuSample
from rackscope.agent.telemetry.exposition import CONTENT_TYPE, GpuExposition, PullReader, WorkloadExposition
from rackscope.agent.telemetry.metrics_server import MetricsServer
from rackscope.agent.telemetry.otlp import (
    CountingExporter,
    GpuInstruments,
    build_otlp_exporter,
    exporter_label,
    http_metrics_url,
)
from rackscope.agent.telemetry.series import EMPTY_SNAPSHOT, NodeIdentity, Snapshot
from rackscope.histograms import HistogramRegistry, attach, merge

log = logging.getLogger(__name__)

AGENT_SCOPE = "rackscope.agent"  # GPU and health instruments (OTLP only)
WORKLOAD_SCOPE = "rackscope.workload"  # the meter handed to the runner
GZIP_MIN_BYTES = 1024  # below this, compressing costs more than it saves
GZIP_LEVEL = 1  # fast: metrics text compresses ~10x even at level 1
SERVICE_NAME = "rackscope-agent"

# The GenAI bucket boundaries of the contract, whatever an SDK instrument of these names asks
# for (the runner's own go through the pre-aggregated registry, with the same boundaries).
HISTOGRAM_VIEWS = (
    View(
        instrument_name=contract.OPERATION_DURATION.otel_name,
        aggregation=ExplicitBucketHistogramAggregation(contract.OPERATION_DURATION_BUCKETS_S),
    ),
    View(
        instrument_name=contract.TIME_TO_FIRST_CHUNK.otel_name,
        aggregation=ExplicitBucketHistogramAggregation(contract.TIME_TO_FIRST_CHUNK_BUCKETS_S),
    ),
    View(
        instrument_name=contract.TIME_PER_OUTPUT_TOKEN.otel_name,
        aggregation=ExplicitBucketHistogramAggregation(contract.TPOT_BUCKETS_S),
    ),
)


class Telemetry:
    """One agent's telemetry.

    Thread use: ``update`` from the sampler thread; ``render`` from any thread; ``serve`` /
    ``close`` on the event loop that should answer scrapes; ``shutdown`` once, at exit.
    """

    def __init__(
        self,
        identity: NodeIdentity | Mapping[str, object],
        settings: AgentSettings,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.identity = NodeIdentity.coerce(identity)
        self.settings = settings
        self._env: Mapping[str, str] = dict(os.environ) if env is None else env
        self.otlp_enabled = bool(settings.otlp_endpoint)
        self.otlp_url: str | None = None
        if settings.otlp_endpoint:
            if settings.otlp_protocol == "http/protobuf":
                self.otlp_url = http_metrics_url(settings.otlp_endpoint, self._env)  # ConfigError early
            else:
                self.otlp_url = settings.otlp_endpoint
        self._update_lock = threading.Lock()
        self._render_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._snapshot: Snapshot = EMPTY_SNAPSHOT
        self._positions: dict[int, int] = {}
        self._gpu_text = GpuExposition(self.identity)
        self._workload_text = WorkloadExposition(skip_scopes=(AGENT_SCOPE,))
        self._cache = b""
        self._cache_gzip: bytes | None = None
        self._cache_generation = -1
        self._cache_time = -math.inf
        self._provider: MeterProvider | None = None
        self._pull: PullReader | None = None
        self._exporter: CountingExporter | None = None
        self._meter: Meter | None = None
        self._histograms = HistogramRegistry(WORKLOAD_SCOPE, self.identity.version)
        self._server: MetricsServer | None = None
        self._shut_down = False

    # --- set-up ----------------------------------------------------------------------------
    def start(self) -> None:
        """Builds the MeterProvider (and the OTLP exporter and its export thread when an
        endpoint is configured). Idempotent; ``meter`` calls it if needed."""
        with self._start_lock:
            if self._provider is not None:
                return
            resource = Resource.create(
                {
                    "service.name": SERVICE_NAME,
                    "service.version": self.identity.version,
                    "host.name": socket.gethostname(),
                    "rackscope.rack": self.identity.rack,
                    "rackscope.node": self.identity.node,
                    # Stable per node, not the SDK's random UUID per process: a restarted agent
                    # continues its own series instead of leaving the old instance's gauges
                    # frozen beside the new ones until the collector expires them.
                    "service.instance.id": f"{self.identity.rack}/{self.identity.node}",
                }
            )
            registry = self._histograms
            pull = PullReader(extend=lambda data: merge(data, registry, resource))
            readers: list[MetricReader] = [pull]
            if self.otlp_enabled:
                self._exporter = CountingExporter(
                    build_otlp_exporter(self.settings, self._env),
                    exporter_label(self.settings.otlp_protocol),
                    extend=lambda data: merge(data, registry, resource) or data,
                )
                readers.append(
                    PeriodicExportingMetricReader(
                        self._exporter,
                        export_interval_millis=self.settings.otlp_interval_s * 1000.0,
                        export_timeout_millis=self.settings.otlp_timeout_s * 1000.0,
                    )
                )
            provider = MeterProvider(
                metric_readers=readers,
                resource=resource,
                views=HISTOGRAM_VIEWS,
                exemplar_filter=AlwaysOffExemplarFilter(),
                shutdown_on_exit=False,  # shutdown() is called explicitly (SIGTERM); atexit would pin agents
            )
            if self.otlp_enabled:
                GpuInstruments(
                    provider.get_meter(AGENT_SCOPE, self.identity.version),
                    self.identity,
                    self._current,
                    self.export_failures_by_exporter,
                    pull.collecting_here,
                )
                log.info("exporting OTLP (%s) to %s", self.settings.otlp_protocol, self.otlp_url)
            self._meter = provider.get_meter(WORKLOAD_SCOPE, self.identity.version)
            # The runner's latency histograms are aggregated in this registry rather than by
            # the SDK (rackscope.histograms); both readers add them to every collection.
            attach(self._meter, registry)
            self._pull = pull
            self._provider = provider

    @property
    def histograms(self) -> HistogramRegistry:
        """The pre-aggregated histograms both export paths carry, in the workload scope: the
        runner's GenAI latencies, and any other family a component adds (``family(...)``, then
        ``cell(attributes).observe(v)`` or ``.set(...)`` for a histogram aggregated elsewhere)."""
        self.start()
        return self._histograms

    @property
    def meter_provider(self) -> MeterProvider:
        """The agent's MeterProvider (for a runner that wants its own named meter)."""
        self.start()
        assert self._provider is not None
        return self._provider

    @property
    def meter(self) -> Meter:
        """The meter the runner records workload metrics into (tokens, requests, GenAI
        histograms, run info); both export paths carry what it records."""
        self.start()
        assert self._meter is not None
        return self._meter

    # --- per tick ---------------------------------------------------------------------------
    def update(
        self,
        infos: Sequence[GpuInfo],
        samples: Sequence[GpuSample],
        collection_duration_s: float | None,
        collection_errors: int = 0,
    ) -> None:
        """Publishes one tick: the GPUs, their samples (matched by ``index``; a GPU without a
        sample shows as down), how long sampling took, and the cumulative count of failed GPU
        samples (rackscope.agent.collection.errors). Cheap: nothing is rendered here."""
        infos_t = tuple(infos)
        with self._update_lock:
            previous = self._snapshot
            if infos_t == previous.infos:
                infos_t = previous.infos  # same object: renderers keep their label tables
            else:
                self._positions = {info.index: i for i, info in enumerate(infos_t)}
            aligned: list[GpuSample | None] = [None] * len(infos_t)
            positions = self._positions
            for sample in samples:
                position = positions.get(sample.index)
                if position is not None:
                    aligned[position] = sample
            self._snapshot = Snapshot(
                infos_t,
                tuple(aligned),
                collection_duration_s,
                collection_errors,
                previous.generation + 1,
            )

    def _current(self) -> Snapshot:
        return self._snapshot

    # --- pull path ----------------------------------------------------------------------------
    def render(self) -> bytes:
        """The /metrics body. Rendered at most once per tick (or once per sampling interval
        when ticks stop), then the cached bytes are returned."""
        with self._render_lock:
            return self._render_locked()

    def render_gzip(self) -> bytes:
        """``render()`` gzip-compressed, compressed once per rendering."""
        with self._render_lock:
            body = self._render_locked()
            if self._cache_gzip is None:
                self._cache_gzip = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
            return self._cache_gzip

    def _render_locked(self) -> bytes:
        snap = self._snapshot
        now = time.monotonic()
        if snap.generation == self._cache_generation and now - self._cache_time < self.settings.interval_s:
            return self._cache
        text = self._gpu_text.render(snap, self.export_failures_by_exporter())
        if self._pull is not None:
            try:
                text += self._workload_text.render(self._pull.pull(self.settings.interval_s))
            except Exception:  # scrape boundary: GPU series must still be served
                log.exception("collecting workload metrics failed; serving GPU series only")
        self._cache = text.encode()
        self._cache_gzip = None
        self._cache_generation = snap.generation
        self._cache_time = now
        return self._cache

    def _body(self, gzip_wanted: bool) -> tuple[bytes, str, str | None]:
        if gzip_wanted:
            body = self.render()
            if len(body) >= GZIP_MIN_BYTES:
                return self.render_gzip(), CONTENT_TYPE, "gzip"
            return body, CONTENT_TYPE, None
        return self.render(), CONTENT_TYPE, None

    async def serve(self, host: str | None = None, port: int | None = None) -> int:
        """Starts the /metrics server on the running loop (default: settings.metrics_host and
        settings.metrics_port; port 0 binds an ephemeral port) and returns the bound port."""
        if self._server is not None:
            raise RuntimeError("the metrics server is already running")
        server = MetricsServer(
            self._body,
            self.settings.metrics_host if host is None else host,
            self.settings.metrics_port if port is None else port,
        )
        bound = await server.start()
        self._server = server
        return bound

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on, once ``serve`` has bound it."""
        return self._server.bound_port if self._server is not None else None

    async def close(self) -> None:
        """Stops the metrics server (connections included)."""
        server, self._server = self._server, None
        if server is not None:
            await server.close()

    # --- push path ----------------------------------------------------------------------------
    def export_failures_by_exporter(self) -> dict[str, int]:
        exporter = self._exporter
        return {exporter.label: exporter.failures} if exporter is not None else {}

    @property
    def export_failures(self) -> int:
        """OTLP exports that failed so far (0 without OTLP)."""
        return self._exporter.failures if self._exporter is not None else 0

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        """Pushes the last OTLP export and stops the MeterProvider. Returns whether that final
        flush completed within ``timeout_s``; it never waits longer (an exporter stuck retrying
        is left to its daemon thread) and never raises. Safe to call twice."""
        provider = self._provider
        if provider is None or self._shut_down:
            return True
        self._shut_down = True
        outcome: list[bool] = []

        def flush_and_stop() -> None:
            # force_flush reports whether the last export landed; shutdown then collects once
            # more, which repeats the same cumulative points (harmless) but is the only way to
            # learn the outcome from the SDK.
            deadline = time.monotonic() + timeout_s
            flushed = False
            try:
                flushed = provider.force_flush(timeout_millis=timeout_s * 1000.0)
            except Exception as exc:  # noqa: BLE001 - shutdown boundary: report, never raise into SIGTERM handling
                log.warning("final OTLP flush failed: %s", exc)
            try:
                provider.shutdown(timeout_millis=max(0.0, deadline - time.monotonic()) * 1000.0)
            except Exception as exc:  # noqa: BLE001 - shutdown boundary, as above
                log.warning("telemetry shutdown failed: %s", exc)
            outcome.append(flushed)

        # The OTLP exporters apply their own timeouts and retries, so bound the wait here.
        worker = threading.Thread(target=flush_and_stop, name="telemetry-shutdown", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            log.warning("the final OTLP export did not finish within %.1f s; not waiting for it", timeout_s)
            return False
        return bool(outcome and outcome[0])
