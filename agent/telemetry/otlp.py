"""The OTLP push path: exporter construction from settings, failure counting, and the GPU
and agent-health observable instruments (created only when OTLP export is on)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.util.re import parse_env_headers

from rackscope import contract
from rackscope.agent.settings import AgentSettings
from rackscope.agent.telemetry.series import (
    GpuSeries,
    NodeIdentity,
    Snapshot,
    gpu_attributes,
    node_info_attributes,
    series_by_metric,
)
from rackscope.contract import Kind, MetricDef
from rackscope.errors import ConfigError

log = logging.getLogger(__name__)

METRICS_PATH = "/v1/metrics"
SIGNAL_ENDPOINT_VAR = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
GENERIC_ENDPOINT_VAR = "OTEL_EXPORTER_OTLP_ENDPOINT"
OWN_ENDPOINT_VAR = "RACKSCOPE_OTLP_ENDPOINT"

# Prometheus needs cumulative series; pin it so OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE
# cannot switch the agent to delta behind the dashboards' back.
CUMULATIVE: dict[type, AggregationTemporality] = dict.fromkeys(
    (Counter, UpDownCounter, Histogram, ObservableCounter, ObservableUpDownCounter, ObservableGauge),
    AggregationTemporality.CUMULATIVE,
)


def _append_metrics_path(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + METRICS_PATH))


def http_metrics_url(endpoint: str, env: Mapping[str, str]) -> str:
    """The URL the OTLP/HTTP exporter posts to, following the OTel spec's rule.

    A signal-specific endpoint (``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``) is used as given;
    the generic ``OTEL_EXPORTER_OTLP_ENDPOINT`` is a base URL that gets ``/v1/metrics``
    appended. Our own ``--otlp-endpoint`` / ``RACKSCOPE_OTLP_ENDPOINT`` is a base URL too,
    unless it already ends in ``/v1/metrics``.
    """
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"OTLP/HTTP endpoint must be an http:// or https:// URL, not {endpoint!r}")
    own = OWN_ENDPOINT_VAR in env
    if not own and env.get(SIGNAL_ENDPOINT_VAR) == endpoint:
        return endpoint
    if not own and SIGNAL_ENDPOINT_VAR not in env and env.get(GENERIC_ENDPOINT_VAR) == endpoint:
        return _append_metrics_path(endpoint)
    if parts.path.rstrip("/").endswith(METRICS_PATH):
        return endpoint
    return _append_metrics_path(endpoint)


def parse_headers(raw: str | None) -> dict[str, str]:
    """``k=v,k2=v2`` (values may be percent-encoded) as in OTEL_EXPORTER_OTLP_HEADERS."""
    if not raw:
        return {}
    return dict(parse_env_headers(raw, liberal=True))


def exporter_label(protocol: str) -> str:
    """The ``exporter`` attribute of rackscope.agent.export.failures."""
    return "otlp_grpc" if protocol == "grpc" else "otlp_http"


def build_otlp_exporter(settings: AgentSettings, env: Mapping[str, str]) -> MetricExporter:
    """The OTel SDK OTLP metric exporter for the configured protocol (settings win over the
    exporter's own environment lookups, which the settings already resolved)."""
    endpoint = settings.otlp_endpoint
    if not endpoint:
        raise ConfigError("no OTLP endpoint configured")
    headers = parse_headers(settings.otlp_headers)
    if settings.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        return GrpcExporter(
            endpoint=endpoint,
            headers=headers or None,
            timeout=settings.otlp_timeout_s,
            preferred_temporality=CUMULATIVE,
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    return HttpExporter(
        endpoint=http_metrics_url(endpoint, env),
        headers=headers,
        timeout=settings.otlp_timeout_s,
        preferred_temporality=CUMULATIVE,
    )


# The OTel exporters log an error on every failed export; during a streak of failures that
# we have already reported, those lines are dropped (only for exports made by our wrapper).
SDK_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
)
_streak_state = threading.local()


class _QuietDuringStreak(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_streak_state, "quiet", False)


_QUIET_FILTER = _QuietDuringStreak()


def _install_quiet_filter() -> None:
    for name in SDK_EXPORT_LOGGERS:
        logger = logging.getLogger(name)
        if _QUIET_FILTER not in logger.filters:
            logger.addFilter(_QUIET_FILTER)


class CountingExporter(MetricExporter):
    """Wraps an exporter: counts failed exports (FAILURE or an exception), logs once per
    streak of failures, and never lets an export error reach the agent. ``extend`` adds data
    aggregated outside the SDK to each export (``rackscope.histograms.merge``)."""

    def __init__(
        self, inner: MetricExporter, label: str, extend: Callable[[MetricsData], MetricsData] | None = None
    ) -> None:
        super().__init__(
            preferred_temporality=dict(inner._preferred_temporality or {}),
            preferred_aggregation=dict(inner._preferred_aggregation or {}),
        )
        self.inner = inner
        self.label = label
        self._extend = extend
        self._lock = threading.Lock()
        self._failures = 0
        self._streak = 0
        _install_quiet_filter()

    @property
    def failures(self) -> int:
        return self._failures

    def _failed(self, reason: str) -> None:
        with self._lock:
            self._failures += 1
            self._streak += 1
            first = self._streak == 1
        if first:
            log.warning("OTLP export (%s) failed: %s; counting further failures quietly", self.label, reason)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        _streak_state.quiet = self._streak > 0
        try:
            if self._extend is not None:
                metrics_data = self._extend(metrics_data)
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:  # noqa: BLE001 - export-thread boundary: telemetry must not break the agent
            self._failed(f"{type(exc).__name__}: {exc}")
            return MetricExportResult.FAILURE
        finally:
            _streak_state.quiet = False
        if result is MetricExportResult.SUCCESS:
            with self._lock:
                streak, self._streak = self._streak, 0
            if streak:
                log.info("OTLP export (%s) recovered after %d failed exports", self.label, streak)
        else:
            self._failed("exporter returned FAILURE")
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


_Attrs = dict[str, str]


class GpuInstruments:
    """Observable instruments for every GPU and agent-health metric; their callbacks read the
    latest Snapshot. Callbacks yield nothing while ``skip()`` is true (the /metrics reader
    collecting: that path renders these series itself)."""

    def __init__(
        self,
        meter: Meter,
        identity: NodeIdentity,
        snapshot: Callable[[], Snapshot],
        failures: Callable[[], Mapping[str, int]],
        skip: Callable[[], bool],
    ) -> None:
        self._identity = identity
        self._snapshot = snapshot
        self._failures = failures
        self._skip = skip
        self._infos: object = None
        self._attrs: dict[str, list[list[tuple[_Attrs, GpuSeries]]]] = {}
        self._identity_attrs: _Attrs = {"rack": identity.rack, "node": identity.node}
        self._lock = threading.Lock()
        for metric, series in series_by_metric():
            self._create(meter, metric, self._gpu_callback(metric.otel_name, series))
        self._create(meter, contract.NODE_INFO, self._node_info)
        self._create(meter, contract.COLLECTION_DURATION, self._duration)
        self._create(meter, contract.COLLECTION_ERRORS, self._errors)
        self._create(meter, contract.EXPORT_FAILURES, self._export_failures)

    @staticmethod
    def _create(
        meter: Meter, metric: MetricDef, callback: Callable[[CallbackOptions], Iterable[Observation]]
    ) -> None:
        if metric.kind is Kind.GAUGE:
            meter.create_observable_gauge(metric.otel_name, [callback], metric.unit, metric.description)
        elif metric.kind is Kind.COUNTER:
            meter.create_observable_counter(metric.otel_name, [callback], metric.unit, metric.description)
        elif metric.kind is Kind.UPDOWNCOUNTER:
            meter.create_observable_up_down_counter(metric.otel_name, [callback], metric.unit, metric.description)
        else:
            raise ValueError(f"{metric.otel_name}: a histogram cannot be observed")

    def _tables(self, snap: Snapshot) -> dict[str, list[list[tuple[_Attrs, GpuSeries]]]]:
        # Attribute dicts per GPU and series, rebuilt only when the GPU list changes.
        with self._lock:
            if snap.infos is not self._infos:
                tables: dict[str, list[list[tuple[_Attrs, GpuSeries]]]] = {}
                for metric, series in series_by_metric():
                    tables[metric.otel_name] = [
                        [(dict(gpu_attributes(self._identity, info) + s.extra), s) for s in series]
                        for info in snap.infos
                    ]
                self._attrs = tables
                self._infos = snap.infos
            return self._attrs

    def _gpu_callback(
        self, otel_name: str, series: tuple[GpuSeries, ...]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        is_up = series[0].metric is contract.GPU_UP

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            if self._skip():
                return []
            snap = self._snapshot()
            rows = self._tables(snap)[otel_name]
            out: list[Observation] = []
            for row, sample, info in zip(rows, snap.samples, snap.infos, strict=True):
                up = sample is not None and sample.ok
                if is_up:
                    out.append(Observation(1 if up else 0, row[0][0]))
                    continue
                if sample is None or not up:
                    continue
                for attrs, s in row:
                    value = s.value(sample, info)
                    if value is not None:
                        out.append(Observation(value, attrs))
            return out

        return observe

    def _node_info(self, _options: CallbackOptions) -> Iterable[Observation]:
        if self._skip():
            return []
        snap = self._snapshot()
        return [Observation(1, dict(node_info_attributes(self._identity, len(snap.infos))))]

    def _duration(self, _options: CallbackOptions) -> Iterable[Observation]:
        duration = self._snapshot().collection_duration_s
        if self._skip() or duration is None:
            return []
        return [Observation(duration, self._identity_attrs)]

    def _errors(self, _options: CallbackOptions) -> Iterable[Observation]:
        if self._skip():
            return []
        return [Observation(self._snapshot().collection_errors, self._identity_attrs)]

    def _export_failures(self, _options: CallbackOptions) -> Iterable[Observation]:
        if self._skip():
            return []
        return [
            Observation(count, {**self._identity_attrs, "exporter": label}) for label, count in self._failures().items()
        ]
