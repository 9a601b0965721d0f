"""Explicit-bucket histograms aggregated outside the OpenTelemetry SDK, exported as the SDK's
own data.

Why: an SDK ``Histogram.record`` cleans and hashes the attributes and walks the reader
storages on every call; a simulated rack records three latencies per request, thousands of
requests a second, and that was the largest single cost of the one-process rack. Here an
observation is a ``bisect`` and a few additions on plain lists, under one lock, and the
attribute set is resolved once, when its cell is made.

The data exported is the same as the SDK's for the same observations: cumulative bucket
counts (bucket ``i`` holds values ``v`` with ``bounds[i-1] < v <= bounds[i]``, the last one
everything above the last bound, as the SDK's ``bisect_left``), count, sum, min and max,
the cell's creation time as the start time. One difference in the last bits of ``sum``: the
SDK adds up the values recorded between two collections and then adds that to its previous
total, once per collection and per reader, so its float rounding depends on when collectors
ran; here ``sum`` is the running total in the order of observation. When every partial sum is
exact (one collection, or values whose sums are exact in binary) the two agree bit for bit.

API::

    registry = HistogramRegistry("rackscope.workload", "0.1.0")
    ttft = registry.family("gen_ai.client.operation.time_to_first_chunk", "s", "Time to first chunk",
                           (0.01, 0.02, ..., 81.92))
    cell = ttft.cell({"rack": "r1", "node": "n01", "gpu": "0", ...})   # once per attribute set
    cell.observe(0.25)                                                  # per observation
    registry.metrics(time.time_ns())   # -> [sdk Metric], cumulative, cells that have data

A cell can also carry a whole cumulative histogram copied from elsewhere, with its own
boundaries, replacing what it held::

    cell.set(boundaries, bucket_counts, sum, count)

``bucket_counts`` are per bucket (not cumulative), one more than ``boundaries`` (the last is
the overflow above the last bound), and ``count`` must be their total. This is for exporting
a histogram someone else aggregated under our own names and attributes, an inference server's
time-to-first-token and inter-token-latency histograms read from its Prometheus page for
instance: convert the page's cumulative ``le`` buckets to per-bucket counts (each ``le``
bucket minus the previous one, ``+Inf`` minus the last finite one), then ``set`` them at
every scrape. Such a cell has no min and max (the page does not carry them: OTLP gets them
unset), keeps the boundaries it was last given, and its start time is when it was first set
(restart the counting source and the counts go down: make a new family or cell then, as a
counter reset would need). A cell is either observed or set, not both; ``observe`` on a set
cell raises.

Export: the host that owns a meter attaches a registry to it (``attach``) and adds
``registry.metrics()`` to every collection its readers make (``merge``). The runner's
workload telemetry asks ``registry_for(meter)`` and records into the registry when there is
one, through the SDK otherwise (a meter with no such host: ``rackscope run`` with its own
exporter). In the agent, ``rackscope.agent.telemetry.pipeline`` does this for both export
paths, the ``/metrics`` text and OTLP. A histogram name must go through one path only: a
family and an SDK instrument of the same name in one scope would export two metrics.
"""

from __future__ import annotations

import builtins
import itertools
import math
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

# The SDK's data classes are imported where data is built, not at load: a load generator that
# exports nothing (``rackscope run`` without a metrics endpoint) imports this module through the
# runner's telemetry and should not pay for the SDK at start-up.
if TYPE_CHECKING:
    from opentelemetry.metrics import Meter
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, Metric, MetricsData
    from opentelemetry.sdk.resources import Resource

AttributeKey = tuple[tuple[str, str], ...]
MetricSource = Callable[[int], "Sequence[Metric]"]  # collection time (ns) -> metrics to export


def _check_boundaries(boundaries: Sequence[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in boundaries)
    if not all(math.isfinite(b) for b in bounds):
        raise ValueError(f"histogram boundaries must be finite: {bounds}")
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"histogram boundaries must increase strictly: {bounds}")
    return bounds


class HistogramCell:
    """One attribute set's histogram: cumulative since it was made (or last ``set``)."""

    __slots__ = (
        "_copied", "_lock", "attributes", "boundaries", "count", "counts", "max", "min", "start_time_unix_nano",
        "sum",
    )

    def __init__(self, attributes: Mapping[str, str], boundaries: tuple[float, ...], lock: threading.Lock) -> None:
        self.attributes = dict(attributes)
        self.boundaries = boundaries
        self.counts = [0] * (len(boundaries) + 1)
        self.count = 0
        self.sum: float = 0  # an int zero, as the SDK's: the first value added sets the type
        self.min = math.inf
        self.max = -math.inf
        self.start_time_unix_nano = 0  # set by the first observation or copy
        self._copied = False
        self._lock = lock

    def observe(self, value: float) -> None:
        """One measurement, folded into the buckets, count, sum, min and max."""
        with self._lock:
            if not self.start_time_unix_nano:
                self.start_time_unix_nano = time.time_ns()
            elif self._copied:
                raise ValueError("this histogram cell carries a copied histogram; it cannot also be observed")
            self.counts[bisect_left(self.boundaries, value)] += 1
            self.count += 1
            self.sum += value
            self.min = min(self.min, value)  # as the SDK compares, so NaN and ties end alike
            self.max = max(self.max, value)

    def set(self, boundaries: Sequence[float], bucket_counts: Sequence[int], sum: float, count: int) -> None:
        """Replace the cell's content with a cumulative histogram aggregated elsewhere (see the
        module docstring): ``bucket_counts`` per bucket, ``len(boundaries) + 1`` of them,
        adding up to ``count``."""
        bounds = _check_boundaries(boundaries)
        counts = [int(c) for c in bucket_counts]
        if len(counts) != len(bounds) + 1:
            raise ValueError(f"{len(counts)} bucket counts for {len(bounds)} boundaries (want boundaries + 1)")
        if any(c < 0 for c in counts) or builtins.sum(counts) != count:
            raise ValueError(f"bucket counts {counts} must be non-negative and add up to count {count}")
        with self._lock:
            if self.start_time_unix_nano and not self._copied:
                raise ValueError("this histogram cell is observed; it cannot also carry a copied histogram")
            if not self._copied:
                self.start_time_unix_nano = time.time_ns()
                self._copied = True
            self.boundaries = bounds
            self.counts = counts
            self.count = int(count)
            self.sum = float(sum)

    def point(self, time_unix_nano: int) -> HistogramDataPoint | None:
        """The cell as a cumulative SDK data point (None before it has any data)."""
        from opentelemetry.sdk.metrics.export import HistogramDataPoint
        with self._lock:
            if not self.start_time_unix_nano:
                return None
            copied = self._copied
            return HistogramDataPoint(
                attributes=self.attributes,
                start_time_unix_nano=self.start_time_unix_nano,
                time_unix_nano=time_unix_nano,
                count=self.count,
                sum=self.sum,
                bucket_counts=tuple(self.counts),
                explicit_bounds=self.boundaries,
                # A copied histogram has no min or max: None leaves them unset in OTLP.
                min=cast(float, None) if copied else self.min,
                max=cast(float, None) if copied else self.max,
                exemplars=[],
            )


class HistogramFamily:
    """One histogram metric: name, unit, description, default boundaries, and its cells."""

    def __init__(
        self, name: str, unit: str, description: str, boundaries: tuple[float, ...], lock: threading.Lock
    ) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.boundaries = boundaries
        self._lock = lock
        self._cells: dict[AttributeKey, HistogramCell] = {}

    def cell(self, attributes: Mapping[str, str]) -> HistogramCell:
        """The cell of one attribute set, made on first use; keep it and call ``observe`` on it."""
        key = tuple(sorted(attributes.items()))
        with self._lock:
            cell = self._cells.get(key)
            if cell is None:
                cell = self._cells[key] = HistogramCell(attributes, self.boundaries, self._lock)
            return cell

    def metric(self, time_unix_nano: int) -> Metric | None:
        from opentelemetry.sdk.metrics.export import AggregationTemporality, Histogram, Metric
        with self._lock:
            cells = list(self._cells.values())
        points = [p for c in cells if (p := c.point(time_unix_nano)) is not None]
        if not points:
            return None
        return Metric(
            name=self.name,
            description=self.description,
            unit=self.unit,
            data=Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE),
        )


class HistogramRegistry:
    """The families one meter's host exports (see the module docstring)."""

    def __init__(self, scope_name: str, scope_version: str | None = None) -> None:
        self.scope_name, self.scope_version = scope_name, scope_version
        self._lock = threading.Lock()
        self._families: dict[str, HistogramFamily] = {}
        self._sources: list[MetricSource] = []

    def family(self, name: str, unit: str, description: str, boundaries: Sequence[float]) -> HistogramFamily:
        """The family called ``name``, made on first use; asking again with other settings is an error."""
        bounds = _check_boundaries(boundaries)
        with self._lock:
            family = self._families.get(name)
            if family is None:
                # One lock per family: observing in one never waits for a collection of another.
                family = self._families[name] = HistogramFamily(name, unit, description, bounds, threading.Lock())
            elif (family.unit, family.description, family.boundaries) != (unit, description, bounds):
                raise ValueError(f"histogram {name} already exists with another unit, description or boundaries")
            return family

    def add_source(self, source: MetricSource) -> None:
        """Export what ``source(time_unix_nano)`` returns with every collection, next to the
        families: for histograms that exist only while something else is current (an inference
        server's, read from a page that may go stale), where a cell would keep the last copy."""
        with self._lock:
            self._sources.append(source)

    def metrics(self, time_unix_nano: int | None = None) -> list[Metric]:
        """Every family with data, and what the sources return, as SDK metrics (cumulative)."""
        now = time.time_ns() if time_unix_nano is None else time_unix_nano
        with self._lock:
            families = list(self._families.values())
            sources = list(self._sources)
        out = [m for f in families if (m := f.metric(now)) is not None]
        for source in sources:
            out.extend(source(now))
        return out


def merge(data: MetricsData | None, registry: HistogramRegistry, resource: Resource) -> MetricsData | None:
    """``data`` (an SDK collection, or None when it had nothing) with the registry's metrics added
    to its scope (a scope of their own when the collection has none by that name), under the
    first resource (``resource`` when ``data`` is None)."""
    from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    extra = registry.metrics()
    if not extra:
        return data
    scope = InstrumentationScope(registry.scope_name, registry.scope_version)
    if data is None or not data.resource_metrics:
        return MetricsData([ResourceMetrics(resource, [ScopeMetrics(scope, extra, "")], resource.schema_url)])
    first, *rest = data.resource_metrics
    scopes = list(first.scope_metrics)
    for i, sm in enumerate(scopes):
        if sm.scope.name == scope.name and sm.scope.version == scope.version:
            scopes[i] = ScopeMetrics(sm.scope, [*sm.metrics, *extra], sm.schema_url)
            break
    else:
        scopes.append(ScopeMetrics(scope, extra, ""))
    return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *rest])


_registries_lock = threading.Lock()
_registries: weakref.WeakKeyDictionary[Meter, HistogramRegistry] = weakref.WeakKeyDictionary()


def attach(meter: Meter, registry: HistogramRegistry) -> None:
    """Declare that whoever owns ``meter`` exports ``registry`` with every collection."""
    with _registries_lock:
        _registries[meter] = registry


def registry_for(meter: Meter) -> HistogramRegistry | None:
    """The registry attached to ``meter``, if its host exports one."""
    with _registries_lock:
        return _registries.get(meter)
