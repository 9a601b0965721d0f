"""All agent settings in one typed object, and how they are resolved.

Order, highest first: command-line argument > ``RACKSCOPE_*`` environment variable >
standard ``OTEL_*`` variable (where one exists) > default. Every variable is listed in
``ENV_VARS`` (and in the README), so none is hidden.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rackscope.contract import IDENTIFIER_PATTERN
from rackscope.engine_metrics.formats import FORMATS as ENGINE_METRICS_FORMATS
from rackscope.errors import ConfigError
from rackscope.runner.config import IDENTIFIER_RULE
from rackscope.runner.datasets import DEFAULT_DATASET_MAX_BYTES

log = logging.getLogger(__name__)

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
    "api_token_file": ("RACKSCOPE_API_TOKEN_FILE", ()),
    "data_dir": ("RACKSCOPE_DATA_DIR", ()),
    "dataset_max_mib": ("RACKSCOPE_DATASET_MAX_MIB", ()),
    "dcgm_url": ("RACKSCOPE_DCGM_URL", ()),
    "dcgm_timeout_s": ("RACKSCOPE_DCGM_TIMEOUT", ()),
    "engine_metrics_url": ("RACKSCOPE_ENGINE_METRICS", ()),
    "engine_metrics_format": ("RACKSCOPE_ENGINE_METRICS_FORMAT", ()),
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
# The token travels in an HTTP header: visible ASCII, no spaces, of a sane length.
TOKEN_PATTERN = re.compile(r"[\x21-\x7e]{1,4096}")
MAX_TOKEN_FILE_BYTES = 65_536
MAX_DATASET_MIB = 65_536


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
    api_token: str | None = field(default=None, repr=False)
    api_token_file: str | None = None  # where api_token was read from, once at start
    # Datasets named by API callers resolve only inside this directory; None: callers may name none.
    data_dir: str | None = None
    dataset_max_mib: int = DEFAULT_DATASET_MAX_BYTES // 2**20
    dcgm_url: str = "http://localhost:9400/metrics"
    # The inference server's own metrics page (None: only a hosted openai run's server, while it runs).
    engine_metrics_url: str | None = None
    engine_metrics_format: str | None = None  # None: detected from the page
    dcgm_timeout_s: float = 2.0  # one whole scrape; the source caps it below interval_s
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
        if not 0.01 <= self.dcgm_timeout_s <= 600:
            raise ConfigError(f"--dcgm-timeout must be between 0.01 and 600 seconds, not {self.dcgm_timeout_s}")
        if self.engine_metrics_format is not None and self.engine_metrics_format not in ENGINE_METRICS_FORMATS:
            raise ConfigError(
                f"--engine-metrics-format must be one of {', '.join(ENGINE_METRICS_FORMATS)}, "
                f"not {self.engine_metrics_format!r}"
            )
        if self.engine_metrics_format is not None and self.engine_metrics_url is None:
            raise ConfigError("--engine-metrics-format needs --engine-metrics URL")
        if self.engine_metrics_url is not None and not _is_http_url(self.engine_metrics_url):
            raise ConfigError(f"--engine-metrics must be an http:// or https:// URL, not {self.engine_metrics_url!r}")
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
        for name in ("rack", "node"):
            if re.fullmatch(IDENTIFIER_PATTERN, getattr(self, name)) is None:
                raise ConfigError(f"--{name} must be {IDENTIFIER_RULE}, not {getattr(self, name)[:40]!r}")
        if self.api_token is not None and TOKEN_PATTERN.fullmatch(self.api_token) is None:
            raise ConfigError("the API token must be 1-4096 visible ASCII characters (no spaces)")
        if not 1 <= self.dataset_max_mib <= MAX_DATASET_MIB:
            raise ConfigError(f"--dataset-max-mib must be between 1 and {MAX_DATASET_MIB}, not {self.dataset_max_mib}")
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ConfigError(f"--data-dir {self.data_dir} is not a directory")
        if self.api_enabled and not is_loopback(self.api_host) and not self.api_token:
            raise ConfigError(
                f"refusing to serve the control API on {self.api_host} without a token: "
                "pass --api-token (or set RACKSCOPE_API_TOKEN), or bind 127.0.0.1"
            )
        return self


def _is_http_url(url: str) -> bool:
    from rackscope.peers import Target

    try:
        Target.parse(url)
    except ValueError:
        return False
    return True


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
    values.update(_token(args, env, base))
    merged = {**{f: getattr(base, f) for f in base.__dataclass_fields__}, **values}
    return AgentSettings(**merged).validate()


def _token(args: Mapping[str, Any], env: Mapping[str, str], base: AgentSettings) -> dict[str, Any]:
    """The API token from one source: the flags if either is given, else the variables; a
    token and a token file from the same level is a mistake, not a precedence."""
    token, path = args.get("api_token"), args.get("api_token_file")
    where = "--api-token and --api-token-file"
    if token is None and path is None:
        token, path = env.get("RACKSCOPE_API_TOKEN") or None, env.get("RACKSCOPE_API_TOKEN_FILE") or None
        where = "RACKSCOPE_API_TOKEN and RACKSCOPE_API_TOKEN_FILE"
        if token is None and path is None:
            return {"api_token": base.api_token, "api_token_file": base.api_token_file}
    if token is not None and path is not None:
        raise ConfigError(f"give the API token once: {where} are both set")
    if path is None:
        return {"api_token": token, "api_token_file": None}
    return {"api_token": read_token_file(path), "api_token_file": path}


def read_token_file(path: str) -> str:
    """The token in ``path`` (surrounding whitespace stripped), read once at start."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"--api-token-file {path}: cannot read it: {exc.strerror or exc}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ConfigError(f"--api-token-file {path} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(MAX_TOKEN_FILE_BYTES + 1)
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(f"--api-token-file {path} is larger than {MAX_TOKEN_FILE_BYTES:,} bytes: not a token")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"--api-token-file {path} holds more than ASCII text") from None
    if not token:
        raise ConfigError(f"--api-token-file {path} is empty")
    if info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("API token file %s is readable by other users (chmod 600 it)", path)
    return token
