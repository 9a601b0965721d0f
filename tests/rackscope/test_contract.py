"""The Prometheus names of the metric contract, checked against the translator's rules."""

import pytest

from rackscope.contract import ALL_METRICS, Kind, prometheus_label, prometheus_name

PUBLIC_NAMES = {
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


@pytest.mark.parametrize(("otel", "prom"), PUBLIC_NAMES.items())
def test_public_names_are_exactly_the_contract(otel: str, prom: str) -> None:
    (metric,) = [m for m in ALL_METRICS if m.otel_name == otel]
    assert metric.prom_name == prom


@pytest.mark.parametrize(
    ("name", "unit", "kind", "expected"),
    [
        ("a.b", "1", Kind.GAUGE, "a_b_ratio"),
        ("a.b", "1", Kind.COUNTER, "a_b_total"),
        ("a.b", "{token}", Kind.COUNTER, "a_b_total"),
        ("a.b", "", Kind.GAUGE, "a_b"),
        ("a.b", "s", Kind.HISTOGRAM, "a_b_seconds"),
        ("a.b_seconds", "s", Kind.GAUGE, "a_b_seconds"),
        ("x", "MHz", Kind.GAUGE, "x_MHz"),
    ],
)
def test_translation_rules(name: str, unit: str, kind: Kind, expected: str) -> None:
    assert prometheus_name(name, unit, kind) == expected


def test_names_are_unique_and_labels_sanitised() -> None:
    names = [m.prom_name for m in ALL_METRICS]
    assert len(names) == len(set(names))
    assert prometheus_label("gen_ai.token.type") == "gen_ai_token_type"
    assert prometheus_label("hw.id") == "hw_id"
    assert prometheus_label("9lives") == "key_9lives"
