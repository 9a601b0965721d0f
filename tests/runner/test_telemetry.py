"""Workload telemetry through the OTel API, read back with the SDK's in-memory reader."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from rackscope import contract
from rackscope.runner.records import RequestRecord
from rackscope.runner.telemetry import WorkloadTelemetry


def metrics_by_name(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    out: dict[str, Any] = {}
    if data is None:
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = m
    return out


def points(metric: Any) -> list[Any]:
    return list(metric.data.data_points)


def rec(rid: str, *, ok: bool = True, gpu: int | None = 0, out: int = 11, error_type: str | None = None,
        first: float | None = 0.25) -> RequestRecord:
    return RequestRecord(rid, 0.0, first, 1.25, 100, out, "engine", ok, error_type, None, None, gpu)


def test_requests_tokens_and_histograms(reader: tuple[InMemoryMetricReader, MeterProvider]) -> None:
    r, provider = reader
    t = WorkloadTelemetry(provider.get_meter("test"), rack="r9", node="n07", model="llama2-70b", engine="sim")
    t.record(rec("a", gpu=2))
    t.record(rec("b", gpu=2))
    t.record(rec("c", ok=False, gpu=None, out=3, error_type="http_5xx"))
    t.record(rec("d", ok=False, gpu=2, out=0, error_type="cancelled", first=None))
    m = metrics_by_name(r)

    tokens = m[contract.TOKENS.otel_name]
    assert tokens.unit == contract.TOKENS.unit
    by_key = {(p.attributes["gpu"], p.attributes["gen_ai.token.type"]): p.value for p in points(tokens)}
    assert by_key == {("2", "input"): 200, ("2", "output"): 22, ("all", "input"): 100, ("all", "output"): 3}
    for p in points(tokens):
        assert set(p.attributes) == {*contract.WORKLOAD_ATTRS, "gen_ai.token.type"}
        assert (p.attributes["rack"], p.attributes["node"], p.attributes["model"], p.attributes["engine"]) == (
            "r9", "n07", "llama2-70b", "sim")

    requests = m[contract.REQUESTS.otel_name]
    outcomes = {(p.attributes["gpu"], p.attributes["outcome"]): p.value for p in points(requests)}
    assert outcomes == {("2", "ok"): 2, ("all", "error"): 1, ("2", "cancelled"): 1}

    for metric_def, buckets, value in (
        (contract.OPERATION_DURATION, contract.OPERATION_DURATION_BUCKETS_S, 1.25),
        (contract.TIME_TO_FIRST_CHUNK, contract.TIME_TO_FIRST_CHUNK_BUCKETS_S, 0.25),
        (contract.TIME_PER_OUTPUT_TOKEN, contract.TPOT_BUCKETS_S, 0.1),
    ):
        hist = m[metric_def.otel_name]
        assert hist.unit == "s"
        (point,) = points(hist)  # only finished requests, all on GPU 2
        assert tuple(point.explicit_bounds) == buckets
        assert point.count == 2
        assert point.sum == pytest.approx(2 * value)
        # The GenAI conventions' required attributes, beside the workload identity.
        assert dict(point.attributes) == {
            "rack": "r9", "node": "n07", "gpu": "2", "model": "llama2-70b", "engine": "sim",
            "gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "rackscope.sim",
            "gen_ai.request.model": "llama2-70b",
        }
        assert set(point.attributes) == set(contract.GENAI_WORKLOAD_ATTRS)


def test_run_info_while_active_only(reader: tuple[InMemoryMetricReader, MeterProvider]) -> None:
    r, provider = reader
    meter = provider.get_meter("test")
    a = WorkloadTelemetry(meter, rack="r1", node="n01", model="m", engine="sim")
    b = WorkloadTelemetry(meter, rack="r1", node="n01", model="m", engine="openai")
    a.run_started("run-a", "offline")
    b.run_started("run-b", "server")
    info = metrics_by_name(r)[contract.RUN_INFO.otel_name]
    got = {p.attributes["run_id"]: (p.value, dict(p.attributes)) for p in points(info)}
    assert set(got) == {"run-a", "run-b"}
    assert got["run-b"] == (1, {"rack": "r1", "node": "n01", "run_id": "run-b", "scenario": "server",
                                "model": "m", "engine": "openai"})
    a.run_ended()
    info = metrics_by_name(r)[contract.RUN_INFO.otel_name]
    assert [p.attributes["run_id"] for p in points(info)] == ["run-b"]
    b.run_ended()
    assert contract.RUN_INFO.otel_name not in metrics_by_name(r) or not points(
        metrics_by_name(r)[contract.RUN_INFO.otel_name])


def test_without_an_sdk_it_is_a_no_op() -> None:
    t = WorkloadTelemetry(None, rack="r1", node="n01", model="m", engine="sim")
    t.run_started("x", "offline")
    t.record(rec("a"))
    t.run_ended()


def test_counters_are_cumulative_across_runs_on_one_meter(reader: tuple[InMemoryMetricReader, MeterProvider]) -> None:
    r, provider = reader
    meter = provider.get_meter("test")
    first = WorkloadTelemetry(meter, rack="r1", node="n01", model="m", engine="sim")
    first.record(rec("a", gpu=0, out=7))
    first.run_ended()
    del first  # a finished run's totals stay: a counter never goes down
    second = WorkloadTelemetry(meter, rack="r1", node="n01", model="m", engine="sim")
    second.record(rec("b", gpu=0, out=5))
    second.record(rec("c", gpu=1, out=2))
    m = metrics_by_name(r)
    tokens = {
        (p.attributes["gpu"], p.attributes["gen_ai.token.type"]): p.value for p in points(m[contract.TOKENS.otel_name])
    }
    assert tokens == {("0", "input"): 200, ("0", "output"): 12, ("1", "input"): 100, ("1", "output"): 2}
    requests = {
        (p.attributes["gpu"], p.attributes["outcome"]): p.value for p in points(m[contract.REQUESTS.otel_name])
    }
    assert requests == {("0", "ok"): 2, ("1", "ok"): 1}  # no zero series for outcomes never seen
    counts = {p.attributes["gpu"]: (p.count, p.sum) for p in points(m[contract.OPERATION_DURATION.otel_name])}
    assert counts == {"0": (2, pytest.approx(2.5)), "1": (1, pytest.approx(1.25))}


@pytest.mark.parametrize(
    ("engine", "api", "operation", "provider"),
    [
        ("openai", "chat", "chat", "openai_compatible"),
        ("openai", "completions", "text_completion", "openai_compatible"),
        ("openai", None, "text_completion", "openai_compatible"),
        ("trtllm", None, "text_completion", "tensorrt_llm"),
        ("hf", "chat", "text_completion", "transformers"),  # the API setting concerns the openai engine only
        ("sim", None, "text_completion", "rackscope.sim"),
        ("my-engine", None, "text_completion", "my-engine"),
    ],
)
def test_operation_and_provider_follow_the_engine_and_its_api(
    reader: tuple[InMemoryMetricReader, MeterProvider], engine: str, api: str | None, operation: str, provider: str
) -> None:
    r, p = reader
    t = WorkloadTelemetry(p.get_meter("test"), rack="r1", node="n01", model="m", engine=engine, api=api)
    t.record(rec("a", gpu=None))
    m = metrics_by_name(r)
    for metric_def in (contract.OPERATION_DURATION, contract.TIME_TO_FIRST_CHUNK, contract.TIME_PER_OUTPUT_TOKEN):
        (point,) = points(m[metric_def.otel_name])
        assert point.attributes["gen_ai.operation.name"] == operation
        assert point.attributes["gen_ai.provider.name"] == provider
        assert point.attributes["gen_ai.request.model"] == "m"
    # The counters keep their own attributes: no series of theirs changes.
    (tokens,) = [pt for pt in points(m[contract.TOKENS.otel_name]) if pt.attributes["gen_ai.token.type"] == "output"]
    assert set(tokens.attributes) == {*contract.WORKLOAD_ATTRS, "gen_ai.token.type"}
