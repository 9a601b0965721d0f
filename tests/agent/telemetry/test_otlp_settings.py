"""OTLP settings from argument > RACKSCOPE_* > OTEL_* > default (``agent.settings.resolve``),
followed all the way to what a real receiver gets: the URL path and the headers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rackscope.agent.settings import AgentSettings, resolve
from rackscope.agent.telemetry import Telemetry
from rackscope.agent.telemetry.otlp import http_metrics_url, parse_headers
from rackscope.errors import ConfigError
from tests.agent.telemetry.expected import IDENTITY, INFOS, samples
from tests.agent.telemetry.otlp_receiver import OtlpHttpReceiver

BASE = AgentSettings(node="n01")
URL = "{url}"  # replaced by the receiver's http://127.0.0.1:PORT


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpHttpReceiver]:
    r = OtlpHttpReceiver()
    yield r
    r.close()


@pytest.mark.parametrize(
    ("args", "env", "path", "headers"),
    [
        # generic OTEL endpoint: a base URL, /v1/metrics appended (OTel spec)
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": URL}, "/v1/metrics", {}),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": URL + "/prefix/"}, "/prefix/v1/metrics", {}),
        # signal-specific OTEL endpoint: used as given, and it wins over the generic one
        ({}, {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": URL + "/custom", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:1"},
         "/custom", {}),
        # our own variable beats both; a base URL unless it already names /v1/metrics
        ({}, {"RACKSCOPE_OTLP_ENDPOINT": URL, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://x:1/v1/metrics"},
         "/v1/metrics", {}),
        ({}, {"RACKSCOPE_OTLP_ENDPOINT": URL + "/v1/metrics"}, "/v1/metrics", {}),
        # the flag beats everything
        ({"otlp_endpoint": URL + "/gw"}, {"RACKSCOPE_OTLP_ENDPOINT": "http://x:1"}, "/gw/v1/metrics", {}),
        # headers: generic < signal-specific < RACKSCOPE_* < flag (percent-encoded values decoded)
        ({"otlp_endpoint": URL}, {"OTEL_EXPORTER_OTLP_HEADERS": "x-a=generic"}, "/v1/metrics", {"x-a": "generic"}),
        ({"otlp_endpoint": URL},
         {"OTEL_EXPORTER_OTLP_HEADERS": "x-a=generic", "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "x-a=metrics"},
         "/v1/metrics", {"x-a": "metrics"}),
        ({"otlp_endpoint": URL},
         {"OTEL_EXPORTER_OTLP_METRICS_HEADERS": "x-a=metrics", "RACKSCOPE_OTLP_HEADERS": "x-a=own,x-b=two%20words"},
         "/v1/metrics", {"x-a": "own", "x-b": "two words"}),
        ({"otlp_endpoint": URL, "otlp_headers": "x-a=flag"}, {"RACKSCOPE_OTLP_HEADERS": "x-a=own"},
         "/v1/metrics", {"x-a": "flag"}),
    ],
)
def test_endpoint_and_headers_reach_the_receiver(
    receiver: OtlpHttpReceiver, args: dict[str, str], env: dict[str, str], path: str, headers: dict[str, str]
) -> None:
    args = {k: v.replace(URL, receiver.url) for k, v in args.items()}
    env = {k: v.replace(URL, receiver.url) for k, v in env.items()}
    settings = resolve(args, env, BASE)
    telemetry = Telemetry(IDENTITY, settings, env=env)
    before = len(receiver.received)
    telemetry.update(INFOS, samples(), 0.01, 0)
    telemetry.start()
    assert telemetry.shutdown(timeout_s=5.0) is True  # the final flush is one export
    got = receiver.received[before:]
    assert got, "nothing exported"
    assert got[0].path == path
    for name, value in headers.items():
        assert got[0].headers[name] == value


@pytest.mark.parametrize(
    ("args", "env", "field", "expected"),
    [
        ({}, {}, "otlp_protocol", "http/protobuf"),
        ({}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "otlp_protocol", "grpc"),
        ({}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"},
         "otlp_protocol", "http/protobuf"),
        ({}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "RACKSCOPE_OTLP_PROTOCOL": "http/protobuf"},
         "otlp_protocol", "http/protobuf"),
        ({"otlp_protocol": "grpc"}, {"RACKSCOPE_OTLP_PROTOCOL": "http/protobuf"}, "otlp_protocol", "grpc"),
        ({}, {}, "otlp_interval_s", 5.0),
        ({}, {"OTEL_METRIC_EXPORT_INTERVAL": "15000"}, "otlp_interval_s", 15.0),  # OTEL_* in milliseconds
        ({}, {"OTEL_METRIC_EXPORT_INTERVAL": "15000", "RACKSCOPE_OTLP_INTERVAL": "2"}, "otlp_interval_s", 2.0),
        ({"otlp_interval_s": 1.0}, {"RACKSCOPE_OTLP_INTERVAL": "2"}, "otlp_interval_s", 1.0),
        ({}, {}, "otlp_timeout_s", 10.0),
        ({}, {"OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}, "otlp_timeout_s", 2.5),
        ({}, {"OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "500"},
         "otlp_timeout_s", 0.5),
        ({}, {"OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "500", "RACKSCOPE_OTLP_TIMEOUT": "3"}, "otlp_timeout_s", 3.0),
        ({}, {}, "otlp_endpoint", None),
        ({}, {}, "metrics_host", "127.0.0.1"),
        ({}, {"OTEL_EXPORTER_PROMETHEUS_HOST": "0.0.0.0"}, "metrics_host", "0.0.0.0"),
        ({}, {}, "metrics_port", 9464),
    ],
)
def test_precedence(args: dict[str, object], env: dict[str, str], field: str, expected: object) -> None:
    assert getattr(resolve(args, env, BASE), field) == expected


@pytest.mark.parametrize(
    ("endpoint", "env", "url"),
    [
        ("http://c:4318", {}, "http://c:4318/v1/metrics"),
        ("http://c:4318/", {}, "http://c:4318/v1/metrics"),
        ("https://c/otlp/v1/metrics", {}, "https://c/otlp/v1/metrics"),
        ("http://c:4318/x", {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/x"}, "http://c:4318/x"),
        ("http://c:4318/v1/metrics", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/v1/metrics"},
         "http://c:4318/v1/metrics/v1/metrics"),  # the spec appends to a generic endpoint, always
    ],
)
def test_http_metrics_url(endpoint: str, env: dict[str, str], url: str) -> None:
    assert http_metrics_url(endpoint, env) == url


@pytest.mark.parametrize("endpoint", ["collector:4318", "ftp://c/x", "http://"])
def test_http_endpoint_must_be_a_url(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="http:// or https://"):
        Telemetry(IDENTITY, AgentSettings(node="n01", otlp_endpoint=endpoint), env={})


def test_parse_headers() -> None:
    assert parse_headers(None) == {}
    assert parse_headers("Authorization=Basic%20abc==, x-b = c") == {"authorization": "Basic abc==", "x-b": "c"}
