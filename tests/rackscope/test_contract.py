"""The OTel-to-Prometheus translation rules of the metric contract (the per-metric table is in
tests/agent/telemetry/test_names.py)."""

import pytest

from rackscope.contract import ALL_METRICS, Kind, prometheus_label, prometheus_name


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
