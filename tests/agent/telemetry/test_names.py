"""The OTel-to-Prometheus name of every metric in the contract, on every path, as a table.

- contract: ``MetricDef.prom_name`` (what dashboards and rules query);
- agent: the name our /metrics endpoint renders;
- collector: no collector runs here, so its translator's documented rules are applied by
  hand in ``COLLECTOR_NAMES`` (dots to underscores; W watts, J joules, By bytes, Cel
  celsius, Hz hertz, s seconds; ``{...}`` dropped; ``_total`` on monotonic sums; ``_ratio``
  for unit ``1`` on gauges; a unit it has no word for, such as MHz, is kept verbatim);
- python-exporter: what ``opentelemetry-exporter-prometheus`` actually renders, run here. It
  differs on unit ``1`` (no ``_ratio``), which is why the agent renders GPU series itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from rackscope.agent.settings import AgentSettings
from rackscope.agent.telemetry import Telemetry
from rackscope.contract import ALL_METRICS, Kind, MetricDef
from tests.agent.telemetry.expected import COLLECTOR_NAMES, IDENTITY, INFOS, samples
from tests.agent.telemetry.otlp_receiver import OtlpHttpReceiver

PUBLIC = {
    "hw.power": "hw_power_watts",
    "hw.energy": "hw_energy_joules_total",
    "hw.gpu.memory.usage": "hw_gpu_memory_usage_bytes",
    "hw.gpu.memory.limit": "hw_gpu_memory_limit_bytes",
    "hw.temperature": "hw_temperature_celsius",
    "hw.gpu.io": "hw_gpu_io_bytes_total",
    "hw.errors": "hw_errors_total",
    "rackscope.tokens": "rackscope_tokens_total",
    "rackscope.requests": "rackscope_requests_total",
}

# What the Python Prometheus exporter gives: the collector's names except for unit "1".
PYTHON_EXPORTER_NAMES = {
    **COLLECTOR_NAMES,
    "hw.gpu.utilization": "hw_gpu_utilization",
    "rackscope.engine.kv_cache.usage": "rackscope_engine_kv_cache_usage",
}

# (OTel name, unit, kind) -> collector name, spelled out for the metrics DESIGN.md calls out.
SPOT_CHECKS = [
    ("hw.power", "W", Kind.GAUGE, "hw_power_watts"),
    ("hw.gpu.utilization", "1", Kind.GAUGE, "hw_gpu_utilization_ratio"),
    ("hw.energy", "J", Kind.COUNTER, "hw_energy_joules_total"),
    ("hw.errors", "{error}", Kind.COUNTER, "hw_errors_total"),
    ("rackscope.gpu.up", "", Kind.GAUGE, "rackscope_gpu_up"),
    ("rackscope.gpu.clock.sm", "Hz", Kind.GAUGE, "rackscope_gpu_clock_sm_hertz"),
]


def type_names(text: str) -> dict[str, str]:
    return {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}


def record_every_metric(meter_provider: object, metrics: tuple[MetricDef, ...], attrs: dict[str, str]) -> None:
    """One instrument per metric of the given kinds, each with one data point."""
    meter = meter_provider.get_meter("names.test")  # type: ignore[attr-defined]

    def one(_options: CallbackOptions) -> list[Observation]:
        return [Observation(1, attrs)]

    for m in metrics:
        if m.kind is Kind.GAUGE:
            meter.create_observable_gauge(m.otel_name, [one], m.unit, m.description)
        elif m.kind is Kind.COUNTER:
            meter.create_counter(m.otel_name, m.unit, m.description).add(1, attrs)
        elif m.kind is Kind.UPDOWNCOUNTER:
            meter.create_up_down_counter(m.otel_name, m.unit, m.description).add(1, attrs)
        else:
            meter.create_histogram(m.otel_name, m.unit, m.description).record(0.5, attrs)


@pytest.fixture(scope="module")
def agent_text() -> Iterator[str]:
    """The agent's /metrics text with every metric present: GPU samples, health (OTLP on, so
    export failures show), and every workload metric recorded through the agent's meter."""
    receiver = OtlpHttpReceiver()
    telemetry = Telemetry(
        IDENTITY, AgentSettings(node="n01", otlp_endpoint=receiver.url, otlp_interval_s=3600.0), env={}
    )
    workload = tuple(m for m in ALL_METRICS if m.otel_name.startswith(("rackscope.tokens", "rackscope.requests",
                                                                         "gen_ai.", "rackscope.run.",
                                                                         "rackscope.engine.",
                                                                         "rackscope.time_per_output_token")))
    record_every_metric(telemetry.meter_provider, workload, {"rack": "r1", "node": "n01", "gpu": "0"})
    telemetry.update(INFOS, samples(), 0.01, 0)
    yield telemetry.render().decode()
    telemetry.shutdown(timeout_s=2.0)
    receiver.close()


@pytest.fixture(scope="module")
def python_exporter_text() -> Iterator[str]:
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry, disable_target_info=True)
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    record_every_metric(provider, ALL_METRICS, {"rack": "r1"})
    yield generate_latest(registry).decode()
    provider.shutdown()


@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda m: m.otel_name)
def test_every_path_gives_the_contract_name(metric: MetricDef, agent_text: str, python_exporter_text: str) -> None:
    expected = COLLECTOR_NAMES[metric.otel_name]
    assert metric.prom_name == expected  # contract == collector rules
    assert type_names(agent_text).get(expected) == {
        Kind.GAUGE: "gauge", Kind.COUNTER: "counter", Kind.UPDOWNCOUNTER: "gauge", Kind.HISTOGRAM: "histogram"
    }[metric.kind]  # the agent's /metrics renders exactly that name, with the right TYPE
    assert PYTHON_EXPORTER_NAMES[metric.otel_name] in type_names(python_exporter_text)


def test_the_agent_renders_no_other_family(agent_text: str) -> None:
    assert set(type_names(agent_text)) == set(COLLECTOR_NAMES.values())


def test_histograms_render_bucket_sum_count(agent_text: str) -> None:
    for name in ("gen_ai_client_operation_duration_seconds", "gen_ai_client_operation_time_to_first_chunk_seconds",
                 "rackscope_time_per_output_token_seconds"):
        lines = [line for line in agent_text.splitlines() if line.startswith(name)]
        assert any(line.startswith(f"{name}_bucket{{") and 'le="+Inf"' in line for line in lines)
        assert any(line.startswith(f"{name}_sum{{") for line in lines)
        assert any(line.startswith(f"{name}_count{{") for line in lines)


def test_python_exporter_differs_only_on_unit_one(python_exporter_text: str) -> None:
    observed = set(type_names(python_exporter_text))
    assert observed == set(PYTHON_EXPORTER_NAMES.values())
    differ = {k for k in COLLECTOR_NAMES if COLLECTOR_NAMES[k] != PYTHON_EXPORTER_NAMES[k]}
    assert differ == {"hw.gpu.utilization", "rackscope.engine.kv_cache.usage"}
    assert "hw_gpu_utilization" in observed
    assert "hw_gpu_utilization_ratio" not in observed


@pytest.mark.parametrize(("otel", "prom"), PUBLIC.items())
def test_public_names_literally(otel: str, prom: str, agent_text: str) -> None:
    (metric,) = [m for m in ALL_METRICS if m.otel_name == otel]
    assert metric.prom_name == prom
    assert COLLECTOR_NAMES[otel] == prom
    assert prom in type_names(agent_text)


@pytest.mark.parametrize(("otel", "unit", "kind", "prom"), SPOT_CHECKS)
def test_contract_units_and_kinds(otel: str, unit: str, kind: Kind, prom: str) -> None:
    (metric,) = [m for m in ALL_METRICS if m.otel_name == otel]
    assert (metric.unit, metric.kind, metric.prom_name) == (unit, kind, prom)
