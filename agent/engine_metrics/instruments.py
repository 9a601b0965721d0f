"""The engine snapshot as OpenTelemetry observable instruments, named by the metric contract.

Registered on the agent's MeterProvider, they reach both export paths with the contract's
names: the agent's ``/metrics`` renders collected OpenTelemetry data, and the OTLP reader
pushes the same. A callback that observes nothing leaves no data point, so while the
snapshot is stale or failed only ``rackscope.engine.up`` 0 is exported: no old number
passes for a current one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from rackscope import contract
from rackscope.agent.engine_metrics.scraper import EngineSnapshot, ScrapeStatus

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


__all__ = ["ENGINE_SCOPE", "EngineInstruments"]
