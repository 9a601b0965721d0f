"""The engine snapshot as OpenTelemetry observable instruments, named by the metric contract.

Registered on the agent's MeterProvider, they reach both export paths with the contract's
names: the agent's ``/metrics`` renders collected OpenTelemetry data, and the OTLP reader
pushes the same. A callback that observes nothing leaves no data point, so while the
snapshot is stale or failed only ``rackscope.engine.up`` 0 is exported: no old number
passes for a current one.

The server's own TTFT and inter-token-latency histograms are cumulative bucket counts it
aggregated itself, which no OpenTelemetry instrument can take over (a histogram instrument only
records observations). ``EngineHistograms`` hands them to the agent's pre-aggregated histogram
registry (``rackscope.histograms``) as a source read at each collection: the server's own
boundaries, per-bucket counts, sum and count, under the contract's names, and nothing while the
page is stale.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from typing import cast

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.export import AggregationTemporality, Histogram, HistogramDataPoint, Metric

from rackscope import contract
from rackscope.engine_metrics.formats import Histogram as ServerHistogram
from rackscope.engine_metrics.scraper import EngineSnapshot, ScrapeStatus

ENGINE_SCOPE = "rackscope.engine"  # the meter's name: one scope for the engine's own view
UNKNOWN_FORMAT = "unknown"  # format attribute of rackscope.engine.up before a page was understood


class EngineInstruments:
    """Observable instruments reading ``snapshot()`` at each collection (None: no server is
    followed now, and nothing is exported, not even ``up``)."""

    def __init__(self, meter: Meter, snapshot: Callable[[], EngineSnapshot | None], rack: str, node: str) -> None:
        self._snapshot = snapshot
        self._identity = {"rack": rack, "node": node}
        for metric, callback in (
            (contract.ENGINE_REQUESTS, self._requests),
            (contract.ENGINE_KV_CACHE_USAGE, self._kv_cache),
            (contract.ENGINE_UP, self._up),
        ):
            meter.create_observable_gauge(metric.otel_name, [callback], metric.unit, metric.description)
        tokens = contract.ENGINE_TOKENS
        meter.create_observable_counter(tokens.otel_name, [self._tokens], tokens.unit, tokens.description)

    def _fresh(self) -> EngineSnapshot | None:
        snap = self._snapshot()
        return snap if snap is not None and snap.status is ScrapeStatus.OK and snap.reading is not None else None

    def _requests(self, _options: CallbackOptions) -> Iterable[Observation]:
        snap = self._fresh()
        if snap is None or snap.reading is None:
            return []
        out = []
        for m in snap.reading.models:
            for state, value in zip(contract.ENGINE_STATES, (m.running, m.waiting), strict=True):
                if value is not None:
                    out.append(Observation(value, {**self._identity, "model": m.model, "state": state}))
        return out

    def _kv_cache(self, _options: CallbackOptions) -> Iterable[Observation]:
        snap = self._fresh()
        if snap is None or snap.reading is None:
            return []
        return [
            Observation(m.kv_cache_usage, {**self._identity, "model": m.model})
            for m in snap.reading.models
            if m.kv_cache_usage is not None
        ]

    def _tokens(self, _options: CallbackOptions) -> Iterable[Observation]:
        snap = self._fresh()
        if snap is None or snap.reading is None:
            return []
        out = []
        for m in snap.reading.models:
            for token_type, value in (("input", m.input_tokens), ("output", m.output_tokens)):
                if value is not None:
                    attrs = {**self._identity, "model": m.model, "gen_ai.token.type": token_type}
                    out.append(Observation(value, attrs))
        return out

    def _up(self, _options: CallbackOptions) -> Iterable[Observation]:
        snap = self._snapshot()
        if snap is None:
            return []
        fmt = snap.format.value if snap.format is not None else UNKNOWN_FORMAT
        return [Observation(1 if snap.status is ScrapeStatus.OK else 0, {**self._identity, "format": fmt})]


def per_bucket(h: ServerHistogram) -> tuple[tuple[float, ...], list[int]] | None:
    """A server's cumulative ``le`` buckets as OpenTelemetry's explicit bounds and per-bucket
    counts (the last one above the last finite bound), or None when they are not whole,
    non-decreasing counts ending in ``+Inf`` (the page was already checked; this is the
    conversion's own guard)."""
    if not h.bounds or h.bounds[-1] != math.inf or len(h.counts) != len(h.bounds):
        return None
    counts: list[int] = []
    previous = 0.0
    for c in h.counts:
        if not (math.isfinite(c) and c == int(c) and c >= previous):
            return None
        counts.append(int(c - previous))
        previous = c
    return h.bounds[:-1], counts


class EngineHistograms:
    """The server's TTFT and ITL histograms, for ``HistogramRegistry.add_source``: called at
    each collection, it returns them from the fresh snapshot only. A histogram's start time is
    when it was first seen, and again after its count went down (the server restarted)."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot | None], rack: str, node: str) -> None:
        self._snapshot = snapshot
        self._identity = {"rack": rack, "node": node}
        self._lock = threading.Lock()
        self._starts: dict[tuple[str, str], tuple[int, int]] = {}  # (metric, model) -> (start ns, last count)

    def __call__(self, time_unix_nano: int) -> list[Metric]:
        snap = self._snapshot()
        if snap is None or snap.status is not ScrapeStatus.OK or snap.reading is None:
            return []
        out = []
        for metric, field in (
            (contract.ENGINE_TIME_TO_FIRST_TOKEN, "ttft_s"),
            (contract.ENGINE_INTER_TOKEN_LATENCY, "itl_s"),
        ):
            points = []
            for m in snap.reading.models:
                h: ServerHistogram | None = getattr(m, field)
                converted = per_bucket(h) if h is not None else None
                if h is None or converted is None or not math.isfinite(h.sum):
                    continue
                bounds, counts = converted
                count = sum(counts)
                points.append(HistogramDataPoint(
                    attributes={**self._identity, "model": m.model},
                    start_time_unix_nano=self._start(metric.otel_name, m.model, count, time_unix_nano),
                    time_unix_nano=time_unix_nano,
                    count=count,
                    sum=h.sum,
                    bucket_counts=tuple(counts),
                    explicit_bounds=bounds,
                    min=cast(float, None),  # a page carries no min or max: left unset in OTLP
                    max=cast(float, None),
                    exemplars=[],
                ))
            if points:
                out.append(Metric(
                    name=metric.otel_name, description=metric.description, unit=metric.unit,
                    data=Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE),
                ))
        return out

    def _start(self, name: str, model: str, count: int, now: int) -> int:
        with self._lock:
            start, last = self._starts.get((name, model), (now, 0))
            if count < last:
                start = now
            self._starts[(name, model)] = (start, count)
            return start


__all__ = ["ENGINE_SCOPE", "EngineHistograms", "EngineInstruments", "per_bucket"]
