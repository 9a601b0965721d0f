"""Prometheus text exposition (format 0.0.4) rendered straight from GPU samples and from
collected OpenTelemetry workload metrics, with the contract's names.

GPU series bypass the OpenTelemetry SDK on purpose: collecting them through the SDK costs
more CPU than the whole agent may spend. Label sets are rendered once per GPU, so a tick
costs one string join per series.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    Sum,
)

from rackscope import contract
from rackscope.agent.sources.base import GpuInfo, OnceLogger
from rackscope.agent.telemetry.series import (
    GpuSeries,
    NodeIdentity,
    Snapshot,
    ValueGetter,
    gpu_attributes,
    node_info_attributes,
    series_by_metric,
)
from rackscope.contract import Kind, prometheus_label, prometheus_name

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_PROM_TYPE = {Kind.GAUGE: "gauge", Kind.COUNTER: "counter", Kind.UPDOWNCOUNTER: "gauge", Kind.HISTOGRAM: "histogram"}
_SPECIAL_FLOATS = {"inf": "+Inf", "-inf": "-Inf", "nan": "NaN"}
_LABEL_CACHE_MAX = 10_000  # distinct workload attribute sets kept rendered


def format_value(value: float) -> str:
    """A sample value as Prometheus reads it: repr-exact, with Go's names for inf/nan."""
    text = repr(value)
    return _SPECIAL_FLOATS.get(text, text)


def format_le(bound: float) -> str:
    """A bucket bound as the collector's translator writes it (Go 'f', -1: "1", "0.01")."""
    if not math.isfinite(bound):
        return format_value(bound)
    return format(Decimal(repr(bound)).normalize(), "f")


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render_labels(attributes: Iterable[tuple[str, str]]) -> str:
    """``{k="v",...}`` with attribute keys mapped to label names; empty string for no labels."""
    inner = ",".join(f'{prometheus_label(k)}="{escape_label_value(v)}"' for k, v in attributes)
    return "{" + inner + "}" if inner else ""


def family_header(name: str, kind: Kind, description: str) -> str:
    return f"# HELP {name} {escape_help(description)}\n# TYPE {name} {_PROM_TYPE[kind]}\n"


def _attribute_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, default=str)


class _Family:
    """One GPU metric family with every GPU's series prefixes ("name{labels} ") rendered."""

    __slots__ = ("header", "is_up", "rows")

    def __init__(self, header: str, is_up: bool, rows: list[list[tuple[str, ValueGetter]]]) -> None:
        self.header = header
        self.is_up = is_up
        self.rows = rows  # per GPU position: (prefix, value getter)


class GpuExposition:
    """Renders a Snapshot's GPU and agent-health series as Prometheus text.

    Label sets are rendered once per set of GPUs (re-rendered only when the GpuInfo list
    changes), so each tick only formats numbers.
    """

    def __init__(self, identity: NodeIdentity) -> None:
        self._identity = identity
        self._infos: tuple[GpuInfo, ...] | None = None
        self._families: list[_Family] = []
        self._node_info = ""
        ident = render_labels((("rack", identity.rack), ("node", identity.node)))
        self._duration_prefix = (
            family_header(contract.COLLECTION_DURATION.prom_name, Kind.GAUGE, contract.COLLECTION_DURATION.description)
            + f"{contract.COLLECTION_DURATION.prom_name}{ident} "
        )
        self._errors_prefix = (
            family_header(contract.COLLECTION_ERRORS.prom_name, Kind.COUNTER, contract.COLLECTION_ERRORS.description)
            + f"{contract.COLLECTION_ERRORS.prom_name}{ident} "
        )
        self._failures_header = family_header(
            contract.EXPORT_FAILURES.prom_name, Kind.COUNTER, contract.EXPORT_FAILURES.description
        )
        self._failure_prefixes: dict[str, str] = {}

    def _prepare(self, infos: tuple[GpuInfo, ...]) -> None:
        identity = self._identity
        base = [gpu_attributes(identity, info) for info in infos]
        families = []
        for metric, series in series_by_metric():
            name = metric.prom_name
            rows = [[(f"{name}{render_labels(attrs + s.extra)} ", s.value) for s in series] for attrs in base]
            header = family_header(name, metric.kind, metric.description)
            families.append(_Family(header, metric is contract.GPU_UP, rows))
        self._families = families
        info_def = contract.NODE_INFO
        self._node_info = (
            family_header(info_def.prom_name, info_def.kind, info_def.description)
            + f"{info_def.prom_name}{render_labels(node_info_attributes(identity, len(infos)))} 1\n"
        )
        self._infos = infos

    def _failure_prefix(self, exporter: str) -> str:
        prefix = self._failure_prefixes.get(exporter)
        if prefix is None:
            identity = self._identity
            labels = render_labels((("rack", identity.rack), ("node", identity.node), ("exporter", exporter)))
            prefix = self._failure_prefixes[exporter] = f"{contract.EXPORT_FAILURES.prom_name}{labels} "
        return prefix

    def render(self, snap: Snapshot, export_failures: Mapping[str, int] | None = None) -> str:
        """GPU families (GPU_METRICS order), node info, then agent health. A None field
        gives no line; a GPU that is down or gave no sample shows only ``up 0``."""
        infos = snap.infos
        if infos is not self._infos and infos != self._infos:
            self._prepare(infos)
        samples = snap.samples
        out: list[str] = []
        append = out.append
        for family in self._families:
            append(family.header)
            mark = len(out)
            if family.is_up:
                for row, sample in zip(family.rows, samples, strict=True):
                    append(row[0][0] + ("1\n" if sample is not None and sample.ok else "0\n"))
            else:
                for row, sample, info in zip(family.rows, samples, infos, strict=True):
                    if sample is None or not sample.ok:
                        continue
                    for prefix, get in row:
                        value = get(sample, info)
                        if value is not None:
                            text = repr(value)
                            append(f"{prefix}{_SPECIAL_FLOATS.get(text, text)}\n")
            if len(out) == mark:  # no GPU reported this metric: drop the bare header
                out.pop()
        append(self._node_info)
        if snap.collection_duration_s is not None:
            append(f"{self._duration_prefix}{format_value(snap.collection_duration_s)}\n")
        append(f"{self._errors_prefix}{snap.collection_errors}\n")
        if export_failures:
            append(self._failures_header)
            for exporter, count in export_failures.items():
                append(f"{self._failure_prefix(exporter)}{count}\n")
        return "".join(out)


def kind_of(data: object) -> Kind | None:
    """The contract kind of collected SDK metric data (None for unsupported data)."""
    if isinstance(data, Gauge):
        return Kind.GAUGE
    if isinstance(data, Sum):
        return Kind.COUNTER if data.is_monotonic else Kind.UPDOWNCOUNTER
    if isinstance(data, Histogram):
        return Kind.HISTOGRAM
    return None


class WorkloadExposition:
    """Renders collected OpenTelemetry metrics (the runner's workload series) with the same
    name mapping as the GPU series: ``prometheus_name`` of the OTel name, unit and kind;
    histograms as ``_bucket`` (with ``le``), ``_sum`` and ``_count``."""

    def __init__(self, skip_scopes: Sequence[str] = ()) -> None:
        self._skip_scopes = frozenset(skip_scopes)
        self._labels: dict[tuple[tuple[str, Any], ...], str] = {}
        self._names: dict[tuple[str, str, Kind], str] = {}
        self._warn = OnceLogger(log)

    def _label_text(self, attributes: Mapping[str, Any] | None, extra: str = "") -> str:
        items = tuple(attributes.items()) if attributes else ()
        key = (*items, ("", extra)) if extra else items
        text = self._labels.get(key)
        if text is None:
            inner = ",".join(
                f'{prometheus_label(k)}="{escape_label_value(_attribute_text(v))}"' for k, v in items
            )
            if extra:
                inner = f"{inner},{extra}" if inner else extra
            text = "{" + inner + "}" if inner else ""
            if len(self._labels) >= _LABEL_CACHE_MAX:
                self._labels.clear()
            self._labels[key] = text
        return text

    def _name(self, otel_name: str, unit: str, kind: Kind) -> str:
        key = (otel_name, unit, kind)
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = prometheus_name(otel_name, unit, kind)
        return name

    def render(self, data: MetricsData | None) -> str:
        if data is None:
            return ""
        # A family must be contiguous and appear once, even when several scopes record it.
        families: dict[str, tuple[Kind, str, list[str]]] = {}
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                if scope_metrics.scope.name in self._skip_scopes:
                    continue
                for metric in scope_metrics.metrics:
                    kind = kind_of(metric.data)
                    if kind is None:
                        self._warn.warn(("type", metric.name), "cannot render %s as Prometheus text", metric.name)
                        continue
                    if (
                        kind is not Kind.GAUGE
                        and getattr(metric.data, "aggregation_temporality", None) is AggregationTemporality.DELTA
                    ):
                        self._warn.warn(("delta", metric.name), "skipping delta metric %s", metric.name)
                        continue
                    name = self._name(metric.name, metric.unit or "", kind)
                    family = families.get(name)
                    if family is None:
                        family = families[name] = (kind, metric.description or "", [])
                    elif family[0] is not kind:
                        self._warn.warn(("clash", name), "metric %s recorded with two kinds; keeping the first", name)
                        continue
                    self._points(name, kind, metric.data.data_points, family[2])
        out: list[str] = []
        for name, (kind, description, lines) in families.items():
            if lines:
                out.append(family_header(name, kind, description))
                out.extend(lines)
        return "".join(out)

    def _points(self, name: str, kind: Kind, points: Sequence[object], out: list[str]) -> None:
        for point in points:
            if isinstance(point, NumberDataPoint):
                out.append(f"{name}{self._label_text(point.attributes)} {format_value(point.value)}\n")
            elif isinstance(point, HistogramDataPoint):
                cumulative = 0
                for bound, count in zip(point.explicit_bounds, point.bucket_counts, strict=False):
                    cumulative += count
                    labels = self._label_text(point.attributes, f'le="{format_le(bound)}"')
                    out.append(f"{name}_bucket{labels} {cumulative}\n")
                labels = self._label_text(point.attributes, 'le="+Inf"')
                out.append(f"{name}_bucket{labels} {point.count}\n")
                plain = self._label_text(point.attributes)
                out.append(f"{name}_sum{plain} {format_value(point.sum)}\n")
                out.append(f"{name}_count{plain} {point.count}\n")


class PullReader(MetricReader):
    """In-process reader the /metrics endpoint collects on demand (cumulative).

    While it collects, ``collecting_here()`` is true on the collecting thread; the GPU
    observable instruments (OTLP only) check it and yield nothing, because the endpoint
    renders GPU series directly from the samples. ``extend`` adds data aggregated outside the
    SDK to each collection (``rackscope.histograms.merge``), also when the SDK had none.
    """

    def __init__(self, extend: Callable[[MetricsData | None], MetricsData | None] | None = None) -> None:
        super().__init__()
        self._local = threading.local()
        self._latest: MetricsData | None = None
        self._extend = extend

    def collecting_here(self) -> bool:
        return bool(getattr(self._local, "active", False))

    def pull(self, timeout_s: float = 5.0) -> MetricsData | None:
        self._local.active = True
        try:
            self._latest = None
            self.collect(timeout_millis=timeout_s * 1000.0)
            return self._extend(self._latest) if self._extend is not None else self._latest
        finally:
            self._local.active = False

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        self._latest = metrics_data

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._latest = None


__all__ = [
    "CONTENT_TYPE",
    "GpuExposition",
    "GpuSeries",
    "PullReader",
    "WorkloadExposition",
    "escape_help",
    "escape_label_value",
    "format_le",
    "format_value",
    "kind_of",
    "render_labels",
]
