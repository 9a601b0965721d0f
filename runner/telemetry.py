"""Workload metrics recorded through the OpenTelemetry API (a no-op until a host installs an SDK).

Names, units, attributes and histogram buckets come from ``rackscope.contract``. One call per
finished request, never per token. The token and request counters are observable counters
whose callbacks read plain integers summed per attribute set (a simulated rack finishes
thousands of requests a second, and an SDK ``add`` costs far more than ``+=``); the three
latency histograms get one ``record`` each with attribute dicts built once per GPU.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from rackscope import __version__, contract
from rackscope.runner.records import CANCELLED, RequestRecord

SCOPE = "rackscope.runner"
ALL_GPUS = "all"  # the gpu attribute when the engine does not say which GPU served a request

Attrs = dict[str, str]


class _Cell:
    """One counter data point: its attributes and its running total."""

    __slots__ = ("attrs", "value")

    def __init__(self, attrs: Attrs) -> None:
        self.attrs = attrs
        self.value = 0


class _Counters:
    """The ``rackscope.tokens`` and ``rackscope.requests`` observable counters of one meter.

    Every ``WorkloadTelemetry`` on the meter adds into the same cells (one per attribute set),
    so totals stay cumulative across runs, as a synchronous counter's would. Only cells that
    were added to are observed, so a series appears with its first request. ``lock`` guards
    the additions (runs may record from different threads) and the callbacks' reads.
    """

    def __init__(self, meter: Meter) -> None:
        self.lock = threading.Lock()
        self._tokens: dict[tuple[tuple[str, str], ...], _Cell] = {}
        self._requests: dict[tuple[tuple[str, str], ...], _Cell] = {}
        meter.create_observable_counter(
            contract.TOKENS.otel_name,
            callbacks=[self._observe_tokens],
            unit=contract.TOKENS.unit,
            description=contract.TOKENS.description,
        )
        meter.create_observable_counter(
            contract.REQUESTS.otel_name,
            callbacks=[self._observe_requests],
            unit=contract.REQUESTS.unit,
            description=contract.REQUESTS.description,
        )

    @staticmethod
    def _cell(cells: dict[tuple[tuple[str, str], ...], _Cell], attrs: Attrs) -> _Cell:
        key = tuple(sorted(attrs.items()))
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = _Cell(attrs)
        return cell

    def tokens(self, attrs: Attrs) -> _Cell:
        with self.lock:
            return self._cell(self._tokens, attrs)

    def requests(self, attrs: Attrs) -> _Cell:
        with self.lock:
            return self._cell(self._requests, attrs)

    @staticmethod
    def _observe(cells: dict[tuple[tuple[str, str], ...], _Cell]) -> list[Observation]:
        return [Observation(c.value, c.attrs) for c in cells.values() if c.value > 0]

    def _observe_tokens(self, options: CallbackOptions) -> Iterable[Observation]:
        with self.lock:
            return self._observe(self._tokens)

    def _observe_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        with self.lock:
            return self._observe(self._requests)


class _GpuAttrs:
    """Every attribute set one GPU's data points use, built once, with its counter cells."""

    __slots__ = ("base", "cancelled", "error", "input", "ok", "output")

    def __init__(self, base: Attrs, counters: _Counters) -> None:
        self.base = base
        self.input = counters.tokens({**base, "gen_ai.token.type": "input"})
        self.output = counters.tokens({**base, "gen_ai.token.type": "output"})
        self.ok = counters.requests({**base, "outcome": "ok"})
        self.error = counters.requests({**base, "outcome": "error"})
        self.cancelled = counters.requests({**base, "outcome": "cancelled"})


class _RunInfo:
    """One observable ``rackscope.run.info`` gauge per meter, reporting the runs active now.

    A meter keeps the first callback an instrument name was registered with, so every run
    recorded through the same meter shares this one callback; a run that ended simply stops
    being observed and its series goes away.
    """

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._active: dict[int, Attrs] = {}
        self._next = 0
        meter.create_observable_gauge(
            contract.RUN_INFO.otel_name,
            callbacks=[self._observe],
            unit=contract.RUN_INFO.unit,
            description=contract.RUN_INFO.description,
        )

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            return [Observation(1, attrs) for attrs in self._active.values()]

    def add(self, attrs: Attrs) -> int:
        with self._lock:
            self._next += 1
            self._active[self._next] = attrs
            return self._next

    def remove(self, handle: int) -> None:
        with self._lock:
            self._active.pop(handle, None)


_run_info_lock = threading.Lock()
_run_info: weakref.WeakKeyDictionary[Meter, _RunInfo] = weakref.WeakKeyDictionary()
_counters: weakref.WeakKeyDictionary[Meter, _Counters] = weakref.WeakKeyDictionary()
_default_meter: list[Meter] = []  # the one meter default telemetries share, once made


def _run_info_for(meter: Meter) -> _RunInfo:
    with _run_info_lock:
        info = _run_info.get(meter)
        if info is None:
            info = _run_info[meter] = _RunInfo(meter)
        return info


def _counters_for(meter: Meter) -> _Counters:
    with _run_info_lock:
        counters = _counters.get(meter)
        if counters is None:
            counters = _counters[meter] = _Counters(meter)
        return counters


def _global_meter() -> Meter:
    """One meter from the global provider for every default telemetry, so they share one
    set of counter cells (the API hands out a new proxy meter per call)."""
    with _run_info_lock:
        if not _default_meter:
            _default_meter.append(metrics.get_meter(SCOPE, __version__))
        return _default_meter[0]


class WorkloadTelemetry:
    """Records finished requests as ``rackscope.tokens``, ``rackscope.requests`` and the GenAI
    latency histograms, with rack, node, gpu, model and engine on every data point."""

    def __init__(
        self,
        meter: Meter | None = None,
        *,
        rack: str,
        node: str,
        model: str,
        engine: str,
    ) -> None:
        self._meter = meter if meter is not None else _global_meter()
        self.rack, self.node, self.model, self.engine = rack, node, model, engine
        m = self._meter
        self._counters = _counters_for(m)
        self._duration = m.create_histogram(
            contract.OPERATION_DURATION.otel_name,
            unit=contract.OPERATION_DURATION.unit,
            description=contract.OPERATION_DURATION.description,
            explicit_bucket_boundaries_advisory=list(contract.OPERATION_DURATION_BUCKETS_S),
        )
        self._ttft = m.create_histogram(
            contract.TIME_TO_FIRST_TOKEN.otel_name,
            unit=contract.TIME_TO_FIRST_TOKEN.unit,
            description=contract.TIME_TO_FIRST_TOKEN.description,
            explicit_bucket_boundaries_advisory=list(contract.TTFT_BUCKETS_S),
        )
        self._tpot = m.create_histogram(
            contract.TIME_PER_OUTPUT_TOKEN.otel_name,
            unit=contract.TIME_PER_OUTPUT_TOKEN.unit,
            description=contract.TIME_PER_OUTPUT_TOKEN.description,
            explicit_bucket_boundaries_advisory=list(contract.TPOT_BUCKETS_S),
        )
        self._by_gpu: dict[int | None, _GpuAttrs] = {}
        self._run_handle: int | None = None

    def _attrs(self, gpu: int | None) -> _GpuAttrs:
        attrs = self._by_gpu.get(gpu)
        if attrs is None:
            base = {
                "rack": self.rack,
                "node": self.node,
                "gpu": ALL_GPUS if gpu is None else str(gpu),
                "model": self.model,
                "engine": self.engine,
            }
            attrs = self._by_gpu[gpu] = _GpuAttrs(base, self._counters)
        return attrs

    def record(self, rec: RequestRecord) -> None:
        """One finished (or failed, or cancelled) request."""
        a = self._by_gpu.get(rec.gpu) or self._attrs(rec.gpu)
        ok = rec.ok
        with self._counters.lock:
            if rec.first_token_s is not None and rec.input_tokens > 0:
                # Prefill happened once a first token came back, whatever the outcome.
                a.input.value += rec.input_tokens
            if rec.output_tokens > 0:
                a.output.value += rec.output_tokens
            if ok:
                a.ok.value += 1
            elif rec.error_type == CANCELLED:
                a.cancelled.value += 1
            else:
                a.error.value += 1
        if ok:
            e2e, ttft, tpot = rec.e2e_s, rec.ttft_s, rec.tpot_s
            if e2e is not None:
                self._duration.record(e2e, a.base)
            if ttft is not None:
                self._ttft.record(ttft, a.base)
            if tpot is not None:
                self._tpot.record(tpot, a.base)

    def run_started(self, run_id: str, scenario: str) -> None:
        """``rackscope.run.info`` reports 1 for this run until ``run_ended``."""
        if self._run_handle is not None:
            self.run_ended()
        attrs = {
            "rack": self.rack, "node": self.node, "run_id": run_id, "scenario": scenario,
            "model": self.model, "engine": self.engine,
        }
        self._run_handle = _run_info_for(self._meter).add(attrs)

    def run_ended(self) -> None:
        if self._run_handle is not None:
            _run_info_for(self._meter).remove(self._run_handle)
            self._run_handle = None

    def describe(self) -> dict[str, Any]:
        return {"rack": self.rack, "node": self.node, "model": self.model, "engine": self.engine}
