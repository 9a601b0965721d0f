"""Settings precedence: argument > RACKSCOPE_* > OTEL_* > default, as a table."""

import pytest

from rackscope.agent.settings import AgentSettings, resolve
from rackscope.errors import ConfigError

BASE = AgentSettings(node="n01")


@pytest.mark.parametrize(
    ("args", "env", "field", "expected"),
    [
        ({}, {}, "otlp_endpoint", None),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "otlp_endpoint", "http://c:4318"),
        (
            {},
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4318",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:4318/v1/metrics",
            },
            "otlp_endpoint",
            "http://m:4318/v1/metrics",
        ),
        (
            {},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318", "RACKSCOPE_OTLP_ENDPOINT": "http://own:4318"},
            "otlp_endpoint",
            "http://own:4318",
        ),
        (
            {"otlp_endpoint": "http://flag:4318"},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318", "RACKSCOPE_OTLP_ENDPOINT": "http://own:4318"},
            "otlp_endpoint",
            "http://flag:4318",
        ),
        ({}, {}, "otlp_protocol", "http/protobuf"),
        ({}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "otlp_protocol", "grpc"),
        ({"otlp_protocol": "http/protobuf"}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "otlp_protocol", "http/protobuf"),
        ({}, {"OTEL_METRIC_EXPORT_INTERVAL": "15000"}, "otlp_interval_s", 15.0),
        ({}, {"OTEL_METRIC_EXPORT_INTERVAL": "15000", "RACKSCOPE_OTLP_INTERVAL": "2"}, "otlp_interval_s", 2.0),
        ({}, {"OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}, "otlp_timeout_s", 2.5),
        ({}, {}, "metrics_port", 9464),
        ({}, {"OTEL_EXPORTER_PROMETHEUS_PORT": "9999"}, "metrics_port", 9999),
        ({}, {"RACKSCOPE_METRICS_PORT": "9000", "OTEL_EXPORTER_PROMETHEUS_PORT": "9999"}, "metrics_port", 9000),
        ({"metrics_port": 0}, {"RACKSCOPE_METRICS_PORT": "9000"}, "metrics_port", 0),
        ({}, {"RACKSCOPE_GPUS": "8"}, "gpus", 8),
        ({}, {"RACKSCOPE_INTERVAL": "0.5"}, "interval_s", 0.5),
        ({}, {}, "api_host", "127.0.0.1"),
        ({}, {"RACKSCOPE_NODE": "n07"}, "node", "n07"),
    ],
)
def test_precedence(args: dict[str, object], env: dict[str, str], field: str, expected: object) -> None:
    assert getattr(resolve(args, env, BASE), field) == expected


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ({"source": "rocm"}, {}, "--source must be one of"),
        ({}, {"RACKSCOPE_GPUS": "four"}, "bad value 'four' for RACKSCOPE_GPUS"),
        ({"gpus": 0}, {}, "--gpus must be between"),
        ({"interval_s": 0.0}, {}, "--interval must be between"),
        ({"api_port": 70000}, {}, "--api-port must be a port number"),
        ({"api_port": 9000, "metrics_port": 9000}, {}, "must differ"),
        ({"api_host": "0.0.0.0"}, {}, "refusing to serve the control API on 0.0.0.0 without a token"),
        ({}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTLP protocol must be one of"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(args: dict[str, object], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(args, env, BASE)


def test_token_allows_binding_off_loopback() -> None:
    settings = resolve({"api_host": "0.0.0.0"}, {"RACKSCOPE_API_TOKEN": "s3cret"}, BASE)
    assert settings.api_token == "s3cret"
    assert resolve({"api_host": "::1"}, {}, BASE).api_host == "::1"
