"""The agent's engine instruments over a real scraper and a real page server on 127.0.0.1: the
contract's names, and only fresh values (a failing page leaves ``up`` 0 and nothing else)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, MetricsData

from rackscope import contract
from rackscope.agent.engine_metrics import ENGINE_SCOPE, EngineHistograms, EngineInstruments
from rackscope.agent.engine_metrics.instruments import per_bucket
from rackscope.engine_metrics import EngineScraper
from rackscope.engine_metrics.formats import EngineFormat, Histogram, ModelReading, Reading
from rackscope.engine_metrics.scraper import EngineSnapshot, ScrapeStatus
from tests.rackscope.engine_metrics.pages import VLLM_V0, VLLM_V1_EARLY, page
from tests.rackscope.engine_metrics.server import PageServer


@pytest.fixture
def server() -> Iterator[PageServer]:
    s = PageServer(page(VLLM_V1_EARLY))
    yield s
    s.close()


def scraper(server: PageServer) -> EngineScraper:
    return EngineScraper(server.url, deadline_s=0.5, max_bytes=64 * 1024, interval_s=1.0)


def collected(reader: InMemoryMetricReader) -> dict[tuple[str, frozenset[tuple[str, object]]], float]:
    data: MetricsData | None = reader.get_metrics_data()
    out: dict[tuple[str, frozenset[tuple[str, object]]], float] = {}
    if data is None:
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            assert sm.scope.name == ENGINE_SCOPE
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    out[(metric.name, frozenset(point.attributes.items()))] = point.value  # type: ignore[union-attr]
    return out


def test_instruments_export_the_contract_and_only_fresh_values(server: PageServer) -> None:
    server.body = page(VLLM_V0)
    s = scraper(server)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    EngineInstruments(provider.get_meter(ENGINE_SCOPE), s.snapshot, "r1", "n01")
    try:
        assert collected(reader) == {
            (contract.ENGINE_UP.otel_name, frozenset({("rack", "r1"), ("node", "n01"), ("format", "unknown")})): 0}
        s.scrape_once()
        model = ("model", "bigscience/bloom-560m")
        ident = {("rack", "r1"), ("node", "n01")}
        assert collected(reader) == {
            (contract.ENGINE_UP.otel_name, frozenset({*ident, ("format", "vllm")})): 1,
            (contract.ENGINE_TOKENS.otel_name, frozenset({*ident, model, ("gen_ai.token.type", "input")})): 1196.0,
            (contract.ENGINE_TOKENS.otel_name, frozenset({*ident, model, ("gen_ai.token.type", "output")})): 218152.0,
        }
        server.body = page(VLLM_V1_EARLY)
        s.scrape_once()
        model = ("model", "Qwen/Qwen2.5-Coder-32B-Instruct")
        assert collected(reader) == {
            (contract.ENGINE_UP.otel_name, frozenset({*ident, ("format", "vllm")})): 1,
            (contract.ENGINE_REQUESTS.otel_name, frozenset({*ident, model, ("state", "running")})): 0.0,
            (contract.ENGINE_REQUESTS.otel_name, frozenset({*ident, model, ("state", "waiting")})): 0.0,
            (contract.ENGINE_KV_CACHE_USAGE.otel_name, frozenset({*ident, model})): 0.0,
        }
        server.mode = "status"
        s.scrape_once()
        assert collected(reader) == {(contract.ENGINE_UP.otel_name, frozenset({*ident, ("format", "vllm")})): 0}
    finally:
        provider.shutdown()


def test_the_server_histograms_have_their_contract_names_ready() -> None:
    # Exported once the pre-aggregated histogram export exists; the names dashboards will query.
    assert [(m.prom_name, m.kind, m.attributes) for m in contract.ENGINE_HISTOGRAMS] == [
        ("rackscope_engine_time_to_first_token_seconds", contract.Kind.HISTOGRAM, ("rack", "node", "model")),
        ("rackscope_engine_inter_token_latency_seconds", contract.Kind.HISTOGRAM, ("rack", "node", "model")),
    ]


def _snapshot(ttft: Histogram | None, status: ScrapeStatus = ScrapeStatus.OK) -> EngineSnapshot:
    reading = Reading(EngineFormat.VLLM, (ModelReading("m", ttft_s=ttft),)) if status is ScrapeStatus.OK else None
    return EngineSnapshot(status, EngineFormat.VLLM, reading, 0.1, None, 1, 0)


def test_a_servers_cumulative_buckets_become_per_bucket_counts() -> None:
    h = Histogram(bounds=(0.1, 0.5, math.inf), counts=(2.0, 5.0, 6.0), sum=1.5, count=6.0)
    assert per_bucket(h) == ((0.1, 0.5), [2, 3, 1])
    # Counts that go down, are not whole, or lack +Inf are no histogram to copy.
    assert per_bucket(Histogram((0.1, math.inf), (3.0, 2.0), 1.0, 2.0)) is None
    assert per_bucket(Histogram((0.1, math.inf), (1.5, 2.0), 1.0, 2.0)) is None
    assert per_bucket(Histogram((0.1, 0.5), (1.0, 2.0), 1.0, 2.0)) is None


def test_server_histograms_are_exported_only_while_fresh_and_restart_with_the_server() -> None:
    current: list[EngineSnapshot | None] = [None]
    source = EngineHistograms(lambda: current[0], "r1", "n01")
    assert source(1) == []
    current[0] = _snapshot(Histogram((0.1, 0.5, math.inf), (2.0, 5.0, 6.0), 1.5, 6.0))
    (metric,) = source(10)
    assert metric.name == contract.ENGINE_TIME_TO_FIRST_TOKEN.otel_name
    (point,) = metric.data.data_points
    assert isinstance(point, HistogramDataPoint)
    assert point.attributes == {"rack": "r1", "node": "n01", "model": "m"}
    assert (point.explicit_bounds, point.bucket_counts, point.count, point.sum) == ((0.1, 0.5), (2, 3, 1), 6, 1.5)
    assert point.start_time_unix_nano == 10
    current[0] = _snapshot(Histogram((0.1, 0.5, math.inf), (3.0, 6.0, 8.0), 2.0, 8.0))
    assert source(20)[0].data.data_points[0].start_time_unix_nano == 10  # the same count, growing
    current[0] = _snapshot(Histogram((0.1, 0.5, math.inf), (1.0, 1.0, 1.0), 0.05, 1.0))
    assert source(30)[0].data.data_points[0].start_time_unix_nano == 30  # the server restarted
    current[0] = _snapshot(None, ScrapeStatus.STALE)
    assert source(40) == []
