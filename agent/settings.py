"""All agent settings in one typed object, and how they are resolved.

Order, highest first: command-line argument > ``RACKSCOPE_*`` environment variable >
standard ``OTEL_*`` variable (where one exists) > default. Every variable is listed in
``ENV_VARS`` (and in the README), so none is hidden.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rackscope.errors import ConfigError

T = TypeVar("T")

SOURCES = ("auto", "nvml", "dcgm", "sim")
OTLP_PROTOCOLS = ("http/protobuf", "grpc")

# setting -> (RACKSCOPE_* variable, standard OTEL_* variables in order of preference)
ENV_VARS: dict[str, tuple[str, tuple[str, ...]]] = {
    "source": ("RACKSCOPE_SOURCE", ()),
    "gpu_model": ("RACKSCOPE_GPU_MODEL", ()),
    "gpus": ("RACKSCOPE_GPUS", ()),
    "rack": ("RACKSCOPE_RACK", ()),
    "node": ("RACKSCOPE_NODE", ()),
    "interval_s": ("RACKSCOPE_INTERVAL", ()),
    "metrics_host": ("RACKSCOPE_METRICS_HOST", ("OTEL_EXPORTER_PROMETHEUS_HOST",)),
    "metrics_port": ("RACKSCOPE_METRICS_PORT", ("OTEL_EXPORTER_PROMETHEUS_PORT",)),
    "api_host": ("RACKSCOPE_API_HOST", ()),
    "api_port": ("RACKSCOPE_API_PORT", ()),
    "api_token": ("RACKSCOPE_API_TOKEN", ()),
    "dcgm_url": ("RACKSCOPE_DCGM_URL", ()),
    "otlp_endpoint": (
        "RACKSCOPE_OTLP_ENDPOINT",
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ),
    "otlp_protocol": (
        "RACKSCOPE_OTLP_PROTOCOL",
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ),
    "otlp_headers": ("RACKSCOPE_OTLP_HEADERS", ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")),
    "otlp_interval_s": ("RACKSCOPE_OTLP_INTERVAL", ("OTEL_METRIC_EXPORT_INTERVAL",)),
    "otlp_timeout_s": ("RACKSCOPE_OTLP_TIMEOUT", ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")),
    "seed": ("RACKSCOPE_SEED", ()),
}

# OTEL_* intervals and timeouts are milliseconds; ours are seconds.
_OTEL_MILLISECONDS = {"otlp_interval_s", "otlp_timeout_s"}


@dataclass(frozen=True)
class AgentSettings:
    source: str = "auto"
    gpu_model: str = "gb300"  # simulated GPU profile (sim source only)
    gpus: int = 4  # simulated GPU count (sim source only)
    rack: str = "r1"
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "node")
    interval_s: float = 1.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # 0: any free port
    metrics_enabled: bool = True
    api_host: str = "127.0.0.1"
    api_port: int = 9470  # 0: any free port
    api_enabled: bool = True
    api_token: str | None = None
    dcgm_url: str = "http://localhost:9400/metrics"
    otlp_endpoint: str | None = None  # None: no OTLP export
    otlp_protocol: str = "http/protobuf"
    otlp_headers: str | None = None  # "k=v,k2=v2" as in OTEL_EXPORTER_OTLP_HEADERS
    otlp_interval_s: float = 5.0
    otlp_timeout_s: float = 10.0
    seed: int = 0

    def validate(self) -> AgentSettings:
        if self.source not in SOURCES:
            raise ConfigError(f"--source must be one of {', '.join(SOURCES)}, not {self.source!r}")
        if self.otlp_protocol not in OTLP_PROTOCOLS:
            raise ConfigError(f"OTLP protocol must be one of {', '.join(OTLP_PROTOCOLS)}, not {self.otlp_protocol!r}")
        if not 0.05 <= self.interval_s <= 3600:
            raise ConfigError(f"--interval must be between 0.05 and 3600 seconds, not {self.interval_s}")
        if self.gpus < 1 or self.gpus > 1024:
            raise ConfigError(f"--gpus must be between 1 and 1024, not {self.gpus}")
        if not 0.1 <= self.otlp_interval_s <= 3600:
            raise ConfigError(f"OTLP export interval must be between 0.1 and 3600 seconds, not {self.otlp_interval_s}")
        for name in ("metrics_port", "api_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')} must be a port number 0-65535, not {port}")
        if self.api_port and self.metrics_port and self.api_port == self.metrics_port:
            raise ConfigError("--api-port and --metrics-port must differ")
        if not self.rack or not self.node:
            raise ConfigError("--rack and --node must not be empty")
        if self.api_enabled and not is_loopback(self.api_host) and not self.api_token:
            raise ConfigError(
                f"refusing to serve the control API on {self.api_host} without a token: "
                "pass --api-token (or set RACKSCOPE_API_TOKEN), or bind 127.0.0.1"
            )
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _convert(name: str, raw: str, kind: Callable[[str], T]) -> T:
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"bad value {raw!r} for {name}") from None


def resolve(args: Mapping[str, Any], env: Mapping[str, str], base: AgentSettings | None = None) -> AgentSettings:
    """Settings from parsed arguments (None means "not given") and an environment."""
    base = base or AgentSettings()
    values: dict[str, Any] = {}
    for name, (own_var, otel_vars) in ENV_VARS.items():
        default = getattr(base, name)
        kind: Callable[[str], Any] = type(default) if default is not None else str
        if args.get(name) is not None:
            values[name] = args[name]
            continue
        if own_var in env:
            values[name] = _convert(own_var, env[own_var], kind)
            continue
        for var in otel_vars:
            if var in env:
                value = _convert(var, env[var], kind)
                values[name] = value / 1000.0 if name in _OTEL_MILLISECONDS else value
                break
    for name, value in args.items():  # settings that only flags set (no environment variable)
        if name not in ENV_VARS and name in base.__dataclass_fields__ and value is not None:
            values[name] = value
    merged = {**{f: getattr(base, f) for f in base.__dataclass_fields__}, **values}
    return AgentSettings(**merged).validate()
