"""OTLP export received by real receivers (HTTP/protobuf and gRPC) decoding the official
protobufs: names, units, kinds, temporality, attributes and values; failures counted, never
raised; the last export flushed on shutdown."""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from rackscope import contract
from rackscope.agent.telemetry import Telemetry
from rackscope.histograms import HistogramFamily
from tests.agent.telemetry.expected import INFOS, KINDS, expected_gpu_points, samples
from tests.agent.telemetry.otlp_receiver import OtlpGrpcReceiver, OtlpHttpReceiver, Point, Received

WORKLOAD_BASE = {"rack": "r1", "node": "n01", "gpu": "0", "model": "llama2-70b", "engine": "sim"}


def record_workload(telemetry: Telemetry) -> None:
    """Counters through the SDK; the latency histograms pre-aggregated in the agent's registry,
    as the runner records them."""
    meter = telemetry.meter
    meter.create_counter("rackscope.tokens", "{token}", "Tokens processed").add(
        1294, {**WORKLOAD_BASE, "gen_ai.token.type": "output"}
    )
    meter.create_counter("rackscope.requests", "{request}", "Requests finished").add(
        4, {**WORKLOAD_BASE, "outcome": "ok"}
    )
    registry = telemetry.histograms

    def family(metric: contract.MetricDef, bounds: tuple[float, ...]) -> HistogramFamily:
        return registry.family(metric.otel_name, metric.unit, metric.description, bounds)

    duration = family(contract.OPERATION_DURATION, contract.OPERATION_DURATION_BUCKETS_S).cell(WORKLOAD_BASE)
    for value in (0.5, 1.5, 100.0):
        duration.observe(value)
    family(contract.TIME_TO_FIRST_CHUNK, contract.TIME_TO_FIRST_CHUNK_BUCKETS_S).cell(WORKLOAD_BASE).observe(0.05)
    family(contract.TIME_PER_OUTPUT_TOKEN, contract.TPOT_BUCKETS_S).cell(WORKLOAD_BASE).observe(0.02)


def has(*names: str) -> Callable[[list[Received]], bool]:
    def check(received: list[Received]) -> bool:
        seen = {m.name for r in received for rm in r.request.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics}
        return set(names) <= seen

    return check


def check_everything(latest: dict[tuple[str, frozenset[tuple[str, Any]]], Point]) -> None:
    # Every metric: unit, data kind, monotonicity and cumulative temporality.
    for point in latest.values():
        unit, kind, monotonic = KINDS[point.name]
        assert (point.unit, point.kind) == (unit, kind), point.name
        if kind == "sum":
            assert point.monotonic is monotonic, point.name
        if kind in ("sum", "histogram"):
            assert point.temporality == "cumulative", point.name
    # GPU series: exactly the expected attribute sets, with the samples' values.
    gpu = {key: p.value for key, p in latest.items() if key[0].startswith(("hw.", "rackscope.gpu."))}
    assert gpu == expected_gpu_points()
    ident = frozenset({"rack": "r1", "node": "n01"}.items())
    assert latest[("rackscope.agent.collection.duration", ident)].value == 0.0125
    assert latest[("rackscope.agent.collection.errors", ident)].value == 7
    info = {"rack": "r1", "node": "n01", "source": "sim", "simulated": "true", "gpu_model": "gb300", "gpus": "4",
            "version": "0.1.0"}
    assert latest[("rackscope.node.info", frozenset(info.items()))].value == 1
    # Workload series recorded through ``meter``.
    tokens = latest[("rackscope.tokens", frozenset({**WORKLOAD_BASE, "gen_ai.token.type": "output"}.items()))]
    assert tokens.value == 1294
    assert latest[("rackscope.requests", frozenset({**WORKLOAD_BASE, "outcome": "ok"}.items()))].value == 4
    duration = latest[("gen_ai.client.operation.duration", frozenset(WORKLOAD_BASE.items()))]
    assert duration.bounds == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
                               81.92]
    assert duration.count == 3
    assert math.isclose(duration.sum or 0.0, 102.0)
    assert duration.bucket_counts == [0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1]
    assert (duration.min, duration.max) == (0.5, 100.0)
    ttft = latest[("gen_ai.client.operation.time_to_first_chunk", frozenset(WORKLOAD_BASE.items()))]
    assert (ttft.bounds[0], ttft.bounds[-1], ttft.count) == (0.01, 81.92, 1)
    tpot = latest[("rackscope.time_per_output_token", frozenset(WORKLOAD_BASE.items()))]
    assert (tpot.bounds[0], tpot.bounds[-1], tpot.count) == (0.01, 2.5, 1)
    # Resource identity.
    resource = next(iter(latest.values())).resource
    assert resource["service.name"] == "rackscope-agent"
    assert resource["rackscope.rack"] == "r1"
    assert resource["rackscope.node"] == "n01"
    assert resource["host.name"] == socket.gethostname()
    # The same on every start of this node's agent, so a restart continues the same series.
    assert resource["service.instance.id"] == "r1/n01"


@pytest.mark.slow
def test_http_protobuf_export_carries_every_metric(
    http_receiver: OtlpHttpReceiver, make_telemetry: Callable[..., Telemetry]
) -> None:
    telemetry = make_telemetry(
        otlp_endpoint=http_receiver.url, otlp_interval_s=0.2, otlp_headers="authorization=Bearer%20s3cret,x-tenant=r1"
    )
    record_workload(telemetry)
    telemetry.update(INFOS, samples(), 0.0125, 7)
    received = http_receiver.wait_for(has("hw.power", "rackscope.tokens", "rackscope.time_per_output_token"))
    assert received[0].path == "/v1/metrics"  # base endpoint: the signal path is appended
    assert received[0].headers["authorization"] == "Bearer s3cret"
    assert received[0].headers["x-tenant"] == "r1"
    assert received[0].headers["content-type"] == "application/x-protobuf"
    check_everything(http_receiver.latest())
    # Values follow the samples from tick to tick.
    later = samples()
    later[0].power_w = 700.0
    telemetry.update(INFOS, later, 0.0125, 7)
    http_receiver.wait_for(lambda _r: any(
        p.name == "hw.power" and p.value == 700.0 for p in http_receiver.points()
    ))


def test_grpc_export_carries_every_metric(
    grpc_receiver: OtlpGrpcReceiver, make_telemetry: Callable[..., Telemetry]
) -> None:
    telemetry = make_telemetry(
        otlp_endpoint=grpc_receiver.url, otlp_protocol="grpc", otlp_interval_s=0.2, otlp_headers="x-tenant=r1"
    )
    record_workload(telemetry)
    telemetry.update(INFOS, samples(), 0.0125, 7)
    received = grpc_receiver.wait_for(has("hw.power", "rackscope.tokens", "rackscope.time_per_output_token"))
    assert received[0].headers["x-tenant"] == "r1"
    check_everything(grpc_receiver.latest())


def test_shutdown_flushes_the_last_export(
    http_receiver: OtlpHttpReceiver, make_telemetry: Callable[..., Telemetry]
) -> None:
    telemetry = make_telemetry(otlp_endpoint=http_receiver.url, otlp_interval_s=3600.0)
    telemetry.start()
    telemetry.update(INFOS, samples(), 0.01, 0)
    assert http_receiver.received == []  # an hour to the first periodic export
    final = samples()
    final[0].energy_j = 555_555.5
    telemetry.update(INFOS, final, 0.01, 0)
    assert telemetry.shutdown(timeout_s=5.0) is True
    energy = [p.value for p in http_receiver.points() if p.name == "hw.energy" and p.attributes["gpu"] == "0"]
    assert energy[-1:] == [555_555.5]
    assert telemetry.shutdown() is True  # a second call is harmless


@pytest.mark.slow
def test_export_failures_are_counted_logged_once_and_not_raised(
    http_receiver: OtlpHttpReceiver, make_telemetry: Callable[..., Telemetry], caplog: pytest.LogCaptureFixture
) -> None:
    http_receiver.status = 503
    telemetry = make_telemetry(otlp_endpoint=http_receiver.url, otlp_interval_s=0.1, otlp_timeout_s=0.3)
    telemetry.update(INFOS, samples(), 0.01, 0)
    with caplog.at_level(logging.INFO):
        telemetry.start()
        deadline = time.monotonic() + 10.0
        while telemetry.export_failures < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert telemetry.export_failures >= 3
        body = telemetry.render().decode()
        assert 'rackscope_agent_export_failures_total{rack="r1",node="n01",exporter="otlp_http"} ' in body
        (line,) = [x for x in body.splitlines() if x.startswith("rackscope_agent_export_failures_total")]
        assert int(line.rsplit(" ", 1)[1]) >= 3
        # The receiver comes back: exports resume and carry the failure count themselves.
        http_receiver.status = 200
        http_receiver.wait_for(has("rackscope.agent.export.failures"))
        assert telemetry.shutdown(timeout_s=5.0) is True
    logger = "rackscope.agent.telemetry.otlp"
    warnings = [r for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one line per streak of failures
    sdk_errors = [r for r in caplog.records if r.name.startswith("opentelemetry.") and r.levelno >= logging.ERROR]
    assert len(sdk_errors) <= 1  # the exporter's own error lines are dropped after the first failure
    assert any("recovered" in r.getMessage() for r in caplog.records if r.name == "rackscope.agent.telemetry.otlp")
    failures = [p for p in http_receiver.points() if p.name == "rackscope.agent.export.failures"]
    assert failures[0].attributes == {"rack": "r1", "node": "n01", "exporter": "otlp_http"}
    assert (failures[0].value or 0) >= 3


def test_receiver_down_counts_failures(make_telemetry: Callable[..., Telemetry]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    telemetry = make_telemetry(otlp_endpoint=f"http://127.0.0.1:{port}", otlp_interval_s=3600.0, otlp_timeout_s=0.5)
    telemetry.update(INFOS, samples(), 0.01, 0)
    telemetry.start()
    started = time.monotonic()
    assert telemetry.shutdown(timeout_s=3.0) is True  # the flush ran (and failed) without raising
    assert time.monotonic() - started < 3.5
    assert telemetry.export_failures >= 1


@pytest.mark.slow
def test_shutdown_is_bounded_when_the_exporter_hangs(make_telemetry: Callable[..., Telemetry]) -> None:
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        telemetry = make_telemetry(
            otlp_endpoint=f"http://127.0.0.1:{port}", otlp_interval_s=3600.0, otlp_timeout_s=30.0
        )
        telemetry.update(INFOS, samples(), 0.01, 0)
        telemetry.start()
        started = time.monotonic()
        assert telemetry.shutdown(timeout_s=0.5) is False
        assert time.monotonic() - started < 1.5
