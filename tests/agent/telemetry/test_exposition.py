"""The Prometheus text the agent renders: parses, carries the samples' values, escapes labels,
leaves unsupported fields out, and appends the workload metrics recorded through ``meter``."""

from __future__ import annotations

import gzip
import math
from collections.abc import Callable

import pytest
from opentelemetry.metrics import CallbackOptions, Observation
from prometheus_client.parser import text_string_to_metric_families

from rackscope import contract
from rackscope.agent.sources.base import GpuInfo, GpuSample
from rackscope.agent.telemetry import Telemetry
from rackscope.agent.telemetry.exposition import escape_label_value, format_le, format_value
from tests.agent.telemetry.expected import INFOS, expected_prom_samples, samples

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: bytes) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def type_lines(body: bytes) -> dict[str, str]:
    return {
        line.split()[2]: line.split()[3] for line in body.decode().splitlines() if line.startswith("# TYPE ")
    }


GPU_PREFIXES = ("hw_", "rackscope_gpu_")


def test_gpu_series_match_the_samples_exactly(make_telemetry: Callable[..., Telemetry]) -> None:
    telemetry = make_telemetry()
    telemetry.update(INFOS, samples(), 0.0125, 7)
    got = parse(telemetry.render())
    gpu_series = {k: v for k, v in got.items() if k[0].startswith(GPU_PREFIXES)}
    assert gpu_series == expected_prom_samples()


def test_none_fields_and_down_gpus_produce_no_lines(make_telemetry: Callable[..., Telemetry]) -> None:
    telemetry = make_telemetry()
    telemetry.update(INFOS, samples(), 0.01, 0)
    got = parse(telemetry.render())
    by_gpu: dict[str, set[str]] = {}
    for name, labels in got:
        gpu = dict(labels).get("gpu")
        if gpu is not None:
            by_gpu.setdefault(gpu, set()).add(name)
    # GPU 1 reports no utilization, temperature, clock, throttle, PCIe or ECC: no line, never a zero.
    assert "hw_gpu_utilization_ratio" not in by_gpu["1"]
    assert "hw_temperature_celsius" not in by_gpu["1"]
    assert "rackscope_gpu_clock_sm_hertz" not in by_gpu["1"]
    assert "rackscope_gpu_throttle" not in by_gpu["1"]
    gpu1_links = {dict(labels)["link"] for name, labels in got if name == "hw_gpu_io_bytes_total"
                  and dict(labels)["gpu"] == "1"}
    assert gpu1_links == {"nvlink"}
    # A GPU that is down, or gave no sample, shows only up 0.
    assert by_gpu["2"] == {"rackscope_gpu_up"}
    assert by_gpu["3"] == {"rackscope_gpu_up"}


def test_node_info_and_agent_health(make_telemetry: Callable[..., Telemetry]) -> None:
    telemetry = make_telemetry()
    telemetry.update(INFOS, samples(), 0.0125, 7)
    got = parse(telemetry.render())
    info = {
        "rack": "r1", "node": "n01", "source": "sim", "simulated": "true", "gpu_model": "gb300", "gpus": "4",
        "version": "0.1.0",
    }
    assert got[("rackscope_node_info", frozenset(info.items()))] == 1.0
    ident = frozenset({"rack": "r1", "node": "n01"}.items())
    assert got[("rackscope_agent_collection_duration_seconds", ident)] == 0.0125
    assert got[("rackscope_agent_collection_errors_total", ident)] == 7.0
    # No OTLP configured: no export-failure series.
    assert not [k for k in got if k[0].startswith("rackscope_agent_export_failures")]
    types = type_lines(telemetry.render())
    assert types["hw_energy_joules_total"] == "counter"
    assert types["hw_gpu_memory_usage_bytes"] == "gauge"
    assert types["rackscope_node_info"] == "gauge"


def test_values_are_repr_exact(make_telemetry: Callable[..., Telemetry]) -> None:
    telemetry = make_telemetry()
    odd = GpuSample(index=0, timestamp_s=0.0, power_w=0.1 + 0.2, energy_j=1e-7, temperature_c=1e21,
                    memory_used_bytes=2**62 + 1)
    telemetry.update(INFOS[:1], [odd], None, 0)
    text = telemetry.render().decode()
    assert "} 0.30000000000000004\n" in text
    assert "} 1e-07\n" in text
    assert "} 1e+21\n" in text
    assert f"}} {2**62 + 1}\n" in text  # integers stay exact
    got = parse(text.encode())
    (power,) = [v for (n, _), v in got.items() if n == "hw_power_watts"]
    assert power == 0.1 + 0.2


def test_label_values_are_escaped(make_telemetry: Callable[..., Telemetry]) -> None:
    nasty = 'NVIDIA "GB300" \\ rev\nB'
    info = GpuInfo(0, 'GPU-"0"', nasty, 288 << 30, 1400.0, True)
    telemetry = make_telemetry()
    telemetry.update([info], [GpuSample(index=0, timestamp_s=0.0, power_w=1.0)], None, 0)
    body = telemetry.render()
    assert b'hw_model="NVIDIA \\"GB300\\" \\\\ rev\\nB"' in body
    (labels,) = [dict(labels) for name, labels in parse(body) if name == "hw_power_watts"]
    assert labels["hw_model"] == nasty
    assert labels["hw_id"] == 'GPU-"0"'
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


def test_rendered_once_per_tick_and_gzip_matches(make_telemetry: Callable[..., Telemetry]) -> None:
    telemetry = make_telemetry(interval_s=60.0)
    telemetry.update(INFOS, samples(), 0.01, 0)
    first = telemetry.render()
    assert telemetry.render() is first  # cached: no re-render between ticks
    assert gzip.decompress(telemetry.render_gzip()) == first
    assert telemetry.render_gzip() is telemetry.render_gzip()
    changed = samples()
    changed[0].power_w = 999.5
    telemetry.update(INFOS, changed, 0.01, 0)
    second = telemetry.render()
    assert second is not first
    assert b"} 999.5\n" in second
    assert gzip.decompress(telemetry.render_gzip()) == second


def test_gpu_list_change_rerenders_labels(make_telemetry: Callable[..., Telemetry]) -> None:
    telemetry = make_telemetry()
    telemetry.update(INFOS[:1], samples()[:1], 0.01, 0)
    assert {dict(labels)["gpu"] for n, labels in parse(telemetry.render()) if n == "rackscope_gpu_up"} == {"0"}
    telemetry.update(INFOS, samples(), 0.01, 0)
    gpus = {dict(labels)["gpu"] for n, labels in parse(telemetry.render()) if n == "rackscope_gpu_up"}
    assert gpus == {"0", "1", "2", "3"}


def test_before_the_first_tick_only_node_health_is_served(make_telemetry: Callable[..., Telemetry]) -> None:
    telemetry = make_telemetry()
    got = parse(telemetry.render())
    assert {name for name, _ in got} == {"rackscope_node_info", "rackscope_agent_collection_errors_total"}


def test_workload_metrics_recorded_through_meter(make_telemetry: Callable[..., Telemetry]) -> None:
    telemetry = make_telemetry()
    meter = telemetry.meter
    base = {"rack": "r1", "node": "n01", "gpu": "0", "model": "llama2-70b", "engine": "sim"}
    tokens = meter.create_counter("rackscope.tokens", "{token}", "Tokens processed")
    tokens.add(1000, {**base, "gen_ai.token.type": "input"})
    tokens.add(294, {**base, "gen_ai.token.type": "output"})
    # A second meter recording the same metric must not produce a second family.
    other = telemetry.meter_provider.get_meter("another.scope")
    other.create_counter("rackscope.tokens", "{token}", "Tokens processed").add(6, {**base, "gpu": "1",
                                                                                  "gen_ai.token.type": "output"})
    requests = meter.create_counter("rackscope.requests", "{request}", "Requests finished")
    requests.add(3, {**base, "outcome": "ok"})
    # A histogram through the SDK (the TPOT convention's boundaries, from the agent's view) and
    # one pre-aggregated in the agent's registry, as the runner records its latencies.
    tpot = meter.create_histogram("rackscope.time_per_output_token", "s", "Time per output token")
    for latency_s in (0.0005, 0.03, 0.03, 0.3, 20.0):
        tpot.record(latency_s, base)
    ttft = telemetry.histograms.family(
        contract.TIME_TO_FIRST_CHUNK.otel_name, "s", "Time to first chunk", contract.TIME_TO_FIRST_CHUNK_BUCKETS_S
    ).cell(base)
    for latency_s in (0.005, 0.03, 0.03, 0.3, 100.0):
        ttft.observe(latency_s)
    in_flight = meter.create_up_down_counter("rackscope.test.inflight", "{request}", "in flight")
    in_flight.add(5, base)
    in_flight.add(-2, base)

    def run_info(_options: CallbackOptions) -> list[Observation]:
        return [Observation(1, {"rack": "r1", "node": "n01", "run_id": "run-1", "scenario": "offline",
                                "model": "llama2-70b", "engine": "sim"})]

    meter.create_observable_gauge("rackscope.run.info", [run_info], "", "run identity")
    telemetry.update(INFOS, samples(), 0.01, 0)
    body = telemetry.render()
    got = parse(body)

    def value(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert value("rackscope_tokens_total", **base, gen_ai_token_type="input") == 1000
    assert value("rackscope_tokens_total", **base, gen_ai_token_type="output") == 294
    assert value("rackscope_tokens_total", **{**base, "gpu": "1"}, gen_ai_token_type="output") == 6
    assert value("rackscope_requests_total", **base, outcome="ok") == 3
    assert value("rackscope_test_inflight", **base) == 3
    assert value("rackscope_run_info", rack="r1", node="n01", run_id="run-1", scenario="offline",
                 model="llama2-70b", engine="sim") == 1
    # Histograms: contract (semantic-convention) buckets, cumulative counts, le as the collector writes it.
    bucket_name = "rackscope_time_per_output_token_seconds_bucket"
    buckets = {dict(labels)["le"]: v for (n, labels), v in got.items() if n == bucket_name}
    assert buckets == {
        "0.01": 1, "0.025": 1, "0.05": 3, "0.075": 3, "0.1": 3, "0.15": 3, "0.2": 3, "0.3": 4, "0.4": 4,
        "0.5": 4, "0.75": 4, "1": 4, "2.5": 4, "+Inf": 5,
    }
    assert value("rackscope_time_per_output_token_seconds_count", **base) == 5
    assert math.isclose(value("rackscope_time_per_output_token_seconds_sum", **base), 20.3605)
    bucket_name = "gen_ai_client_operation_time_to_first_chunk_seconds_bucket"
    buckets = {dict(labels)["le"]: v for (n, labels), v in got.items() if n == bucket_name}
    assert buckets == {
        "0.01": 1, "0.02": 1, "0.04": 3, "0.08": 3, "0.16": 3, "0.32": 4, "0.64": 4, "1.28": 4, "2.56": 4,
        "5.12": 4, "10.24": 4, "20.48": 4, "40.96": 4, "81.92": 4, "+Inf": 5,
    }
    assert value("gen_ai_client_operation_time_to_first_chunk_seconds_count", **base) == 5
    assert math.isclose(value("gen_ai_client_operation_time_to_first_chunk_seconds_sum", **base), 100.365)
    types = type_lines(body)
    assert types["rackscope_tokens_total"] == "counter"
    assert types["rackscope_time_per_output_token_seconds"] == "histogram"
    assert types["gen_ai_client_operation_time_to_first_chunk_seconds"] == "histogram"
    assert types["rackscope_test_inflight"] == "gauge"
    assert list(type_lines(body)).count("rackscope_tokens_total") == 1
    assert body.decode().count("# TYPE rackscope_tokens_total ") == 1


@pytest.mark.slow
def test_gpu_series_are_not_duplicated_when_otlp_is_on(
    make_telemetry: Callable[..., Telemetry], http_receiver: object
) -> None:
    telemetry = make_telemetry(otlp_endpoint=http_receiver.url, otlp_interval_s=3600.0)  # type: ignore[attr-defined]
    telemetry.start()
    telemetry.update(INFOS, samples(), 0.01, 0)
    body = telemetry.render()
    assert body.decode().count("# TYPE hw_power_watts gauge") == 1
    assert len([k for k in parse(body) if k[0] == "hw_power_watts"]) == 2  # GPUs 0 and 1
    got = parse(body)
    failures = frozenset({"rack": "r1", "node": "n01", "exporter": "otlp_http"}.items())
    assert got[("rackscope_agent_export_failures_total", failures)] == 0


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1.0"), (0.1, "0.1"), (3, "3"), (math.inf, "+Inf"), (-math.inf, "-Inf"), (math.nan, "NaN"),
        (1e300, "1e+300"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


@pytest.mark.parametrize(
    ("bound", "text"),
    [(1.0, "1"), (0.01, "0.01"), (81.92, "81.92"), (10.0, "10"), (1e-05, "0.00001"), (math.inf, "+Inf")],
)
def test_bucket_bounds_formatted_like_the_collector(bound: float, text: str) -> None:
    assert format_le(bound) == text
