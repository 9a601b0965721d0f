"""Workload metrics recorded through the OpenTelemetry API (a no-op until a host installs an SDK).

Names, units, attributes and histogram buckets come from ``rackscope.contract``. One call per
finished request, never per token. The token and request counters are observable counters
whose callbacks read plain integers summed per attribute set (a simulated rack finishes
thousands of requests a second, and an SDK ``add`` costs far more than ``+=``). The three
latency histograms go into a ``rackscope.histograms`` registry when the meter's host exports
one (the agent does, on both of its export paths: a bisect and a few additions per value),
and through the SDK's ``record`` otherwise; attribute sets are built once per GPU either way.
The GenAI histograms carry the semantic conventions' ``gen_ai.operation.name``,
``gen_ai.provider.name`` and ``gen_ai.request.model`` (``rackscope.contract``).

Output tokens count as they stream, not only when a request ends: a run registers a live
source (``WorkloadTelemetry.add_live_source``) that says, when a collector asks, how many
output tokens its requests still in flight have received, per GPU. The ``rackscope.tokens``
callback reports finished tokens plus those, so the exported counter is exact at every
collection instead of jumping when long requests end. Nothing is done per token: a collection
asks the engine once when it counts its open requests itself (``CountsLiveTokens``: the
simulated engine, the openai engine's whole-request calls), or reads the streamed requests'
own counts otherwise (``runner.runloop.Runner.live_tokens``).

A counter must never go down, yet a request's final count can be below what was counted live
(the server's ``usage`` figure under the chunks counted, a request cut short whose partial
tokens are dropped, a GPU learned only at the end). So each data point reports the highest
value it has reported, and resumes climbing once the true total passes it again.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation

from rackscope import __version__, contract, histograms
from rackscope.runner.records import CANCELLED, RequestRecord

log = logging.getLogger(__name__)

SCOPE = "rackscope.runner"
ALL_GPUS = "all"  # the gpu attribute when the engine does not say which GPU served a request

Attrs = dict[str, str]
LiveSource = Callable[[], Mapping[int | None, int]]
"""Output tokens received so far by requests still in flight, per GPU index (None: the engine
does not say which GPU); see ``WorkloadTelemetry.add_live_source``."""


class _Cell:
    """One counter data point: its attributes, its running total of finished requests and
    the highest value it has reported (a counter never goes down)."""

    __slots__ = ("attrs", "reported", "value")

    def __init__(self, attrs: Attrs) -> None:
        self.attrs = attrs
        self.value = 0
        self.reported = 0


class _Live:
    """A registered live source and how its GPU keys map to output-token cells."""

    __slots__ = ("cell_for", "source")

    def __init__(self, source: LiveSource, cell_for: Callable[[int | None], _Cell]) -> None:
        self.source = source
        self.cell_for = cell_for


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
        self._live: dict[int, _Live] = {}
        self._next_live = 0
        self._failed_sources: set[int] = set()  # logged once each
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

    def add_live(self, live: _Live) -> Callable[[], None]:
        with self.lock:
            self._next_live += 1
            handle = self._next_live
            self._live[handle] = live

        def remove() -> None:
            with self.lock:
                self._live.pop(handle, None)

        return remove

    @staticmethod
    def _observe(cells: dict[tuple[tuple[str, str], ...], _Cell]) -> list[Observation]:
        return [Observation(c.value, c.attrs) for c in cells.values() if c.value > 0]

    def _live_counts(self, sources: list[tuple[int, _Live]]) -> dict[_Cell, int]:
        """Ask every live source (outside the lock: a source may create cells)."""
        counts: dict[_Cell, int] = {}
        for handle, live in sources:
            try:
                partial = live.source()
                for gpu, tokens in partial.items():
                    if tokens > 0:
                        cell = live.cell_for(gpu)
                        counts[cell] = counts.get(cell, 0) + tokens
            except Exception:  # collection boundary: a broken source must not stop the export
                if handle not in self._failed_sources:
                    self._failed_sources.add(handle)
                    log.exception("a live token source failed; its requests count when they end")
        return counts

    def _observe_tokens(self, options: CallbackOptions) -> Iterable[Observation]:
        # Finished totals first, live counts second: a request that ends in between has left
        # the live count before its tokens reach the totals (the run drops it from its
        # in-flight set before recording it), so it is missed for one collection at worst,
        # never counted twice.
        with self.lock:
            finished = {id(c): c.value for c in self._tokens.values()}
            sources = list(self._live.items())
        live = self._live_counts(sources) if sources else {}
        out = []
        with self.lock:
            for cell in self._tokens.values():
                cell.reported = max(cell.reported, finished.get(id(cell), 0) + live.get(cell, 0))
                if cell.reported > 0:
                    out.append(Observation(cell.reported, cell.attrs))
        return out

    def _observe_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        with self.lock:
            return self._observe(self._requests)


Observe = Callable[[float], None]


class _GpuAttrs:
    """Every attribute set one GPU's data points use, built once, with its counter cells and
    its three latency observers (duration, time to first chunk, time per output token)."""

    __slots__ = ("base", "cancelled", "error", "input", "observe", "ok", "output")

    def __init__(self, base: Attrs, counters: _Counters, observe: tuple[Observe, Observe, Observe]) -> None:
        self.base = base
        self.input = counters.tokens({**base, "gen_ai.token.type": "input"})
        self.output = counters.tokens({**base, "gen_ai.token.type": "output"})
        self.ok = counters.requests({**base, "outcome": "ok"})
        self.error = counters.requests({**base, "outcome": "error"})
        self.cancelled = counters.requests({**base, "outcome": "cancelled"})
        self.observe = observe


# The latency histograms and their boundaries, in _GpuAttrs.observe order.
LATENCY_HISTOGRAMS = (
    (contract.OPERATION_DURATION, contract.OPERATION_DURATION_BUCKETS_S),
    (contract.TIME_TO_FIRST_CHUNK, contract.TIME_TO_FIRST_CHUNK_BUCKETS_S),
    (contract.TIME_PER_OUTPUT_TOKEN, contract.TPOT_BUCKETS_S),
)


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
    latency histograms, with rack, node, gpu, model and engine on every data point.

    ``api``: the openai engine's API (``completions`` or ``chat``), which decides
    ``gen_ai.operation.name``; leave it out for the in-process engines."""

    def __init__(
        self,
        meter: Meter | None = None,
        *,
        rack: str,
        node: str,
        model: str,
        engine: str,
        api: str | None = None,
    ) -> None:
        self._meter = meter if meter is not None else _global_meter()
        self._exported = meter is not None
        self.rack, self.node, self.model, self.engine = rack, node, model, engine
        self.operation = contract.genai_operation(engine, api)
        self.provider = contract.genai_provider(engine)
        m = self._meter
        self._counters = _counters_for(m)
        registry = histograms.registry_for(m)
        self._families: tuple[histograms.HistogramFamily, ...] = ()
        self._instruments: tuple[Histogram, ...] = ()
        if registry is not None:
            self._families = tuple(
                registry.family(d.otel_name, d.unit, d.description, bounds) for d, bounds in LATENCY_HISTOGRAMS
            )
        else:
            self._instruments = tuple(
                m.create_histogram(
                    d.otel_name, unit=d.unit, description=d.description,
                    explicit_bucket_boundaries_advisory=list(bounds),
                )
                for d, bounds in LATENCY_HISTOGRAMS
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
            genai = {
                **base,
                "gen_ai.operation.name": self.operation,
                "gen_ai.provider.name": self.provider,
                "gen_ai.request.model": self.model,
            }
            observe: tuple[Observe, ...]
            if self._families:
                observe = tuple(f.cell(genai).observe for f in self._families)
            else:
                observe = tuple(functools.partial(h.record, attributes=genai) for h in self._instruments)
            d, f, t = observe
            attrs = self._by_gpu[gpu] = _GpuAttrs(base, self._counters, (d, f, t))
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
            duration, first_chunk, per_token = a.observe
            e2e, ttft, tpot = rec.e2e_s, rec.ttft_s, rec.tpot_s
            if e2e is not None:
                duration(e2e)
            if ttft is not None:
                first_chunk(ttft)
            if tpot is not None:
                per_token(tpot)

    def add_live_source(self, source: LiveSource) -> Callable[[], None]:
        """Count the output tokens of requests still in flight in ``rackscope.tokens`` from now
        on; returns the function that unregisters ``source`` (call it when the run ends).

        ``source()`` returns ``{gpu index or None: output tokens received so far}`` over the
        requests that have not yet been passed to ``record``. It is called at every collection
        (the /metrics scrape, each OTLP export), possibly from the exporter's thread while the
        requests' own loop runs, so it must be cheap, must not block, and must tolerate reading
        counts that are changing. A request must leave its count no later than it is passed to
        ``record``: leaving it earlier only makes one collection low, leaving it later makes
        one collection high and then holds the counter there until the true total catches up.
        Several sources may be registered at once (runs on one meter, a multi-process run's
        workers); a source that raises is logged once and skipped.
        """
        return self._counters.add_live(_Live(source, self._output_cell))

    def _output_cell(self, gpu: int | None) -> _Cell:
        return (self._by_gpu.get(gpu) or self._attrs(gpu)).output

    @property
    def exported(self) -> bool:
        """Whether a host handed in a meter (the agent, a run with metrics export): only then
        does anyone collect these metrics, so only then is live counting worth its cost."""
        return self._exported

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
