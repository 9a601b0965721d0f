"""Settings precedence: argument > RACKSCOPE_* > OTEL_* > default, as a table; the token, data
directory and identity checks."""

import logging
from pathlib import Path

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


# --- the API token and the data directory ----------------------------------------------------------
def token_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ({"api_token_file": "FILE"}, {}, "from-file"),
        ({}, {"RACKSCOPE_API_TOKEN_FILE": "FILE"}, "from-file"),
        ({"api_token": "from-flag"}, {"RACKSCOPE_API_TOKEN_FILE": "FILE"}, "from-flag"),
        ({"api_token_file": "FILE"}, {"RACKSCOPE_API_TOKEN": "from-env"}, "from-file"),
        ({}, {"RACKSCOPE_API_TOKEN": "from-env"}, "from-env"),
        ({}, {"RACKSCOPE_API_TOKEN": ""}, None),
    ],
)
def test_token_sources(tmp_path: Path, args: dict[str, str], env: dict[str, str], expected: str | None) -> None:
    path = token_file(tmp_path, "\n  from-file \t\n")
    fill = {k: path if v == "FILE" else v for k, v in args.items()}
    settings = resolve(fill, {k: path if v == "FILE" else v for k, v in env.items()}, BASE)
    assert settings.api_token == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("  \n", "is empty"),
        ("two words", "visible ASCII"),
        ("x" * 70_000, "larger than 65,536 bytes"),
        ("t\u00f6ken", "more than ASCII"),
    ],
)
def test_bad_token_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve({"api_token_file": token_file(tmp_path, content)}, {}, BASE)


def test_token_file_that_cannot_be_read_or_comes_twice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        resolve({"api_token_file": str(tmp_path / "missing")}, {}, BASE)
    with pytest.raises(ConfigError, match="not a regular file"):
        resolve({"api_token_file": str(tmp_path)}, {}, BASE)
    path = token_file(tmp_path, "x")
    with pytest.raises(ConfigError, match="give the API token once"):
        resolve({"api_token": "a", "api_token_file": path}, {}, BASE)
    with pytest.raises(ConfigError, match="give the API token once"):
        resolve({}, {"RACKSCOPE_API_TOKEN": "a", "RACKSCOPE_API_TOKEN_FILE": path}, BASE)


def test_a_token_file_others_can_read_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert resolve({"api_token_file": token_file(tmp_path, "t", 0o644)}, {}, BASE).api_token == "t"
    assert "readable by other users" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resolve({"api_token_file": token_file(tmp_path, "t", 0o600)}, {}, BASE)
    assert caplog.text == ""


def test_data_dir_and_dataset_limit(tmp_path: Path) -> None:
    settings = resolve({}, {"RACKSCOPE_DATA_DIR": str(tmp_path), "RACKSCOPE_DATASET_MAX_MIB": "16"}, BASE)
    assert (settings.data_dir, settings.dataset_max_mib) == (str(tmp_path), 16)
    assert resolve({}, {}, BASE).data_dir is None
    assert resolve({}, {}, BASE).dataset_max_mib == 256
    with pytest.raises(ConfigError, match="is not a directory"):
        resolve({"data_dir": str(tmp_path / "missing")}, {}, BASE)
    with pytest.raises(ConfigError, match="--dataset-max-mib must be between"):
        resolve({"dataset_max_mib": 0}, {}, BASE)


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 129, "bad\nname"])
def test_identity_must_be_a_plain_name(name: str) -> None:
    with pytest.raises(ConfigError, match="--node must be"):
        resolve({"node": name}, {}, BASE)
