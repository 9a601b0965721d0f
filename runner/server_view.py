"""The server's own view of a run: its metrics page read while the run lasts, summed up over the
measured window and held against what the client counted (the record's ``server`` section).

``ServerWatch`` reads the page of an ``openai`` run's server (``--engine-metrics URL``, or the
``--url`` server's origin + ``/metrics``) once before the run, every second during it on the
scraper's own thread, and once after it when that reading can stand for the window's end. The
reads are bounded (``rackscope.engine_metrics.scraper``: a whole-read deadline, a size cap, a
stop flag), so a server without a page, or a hostile one, costs the run at most one deadline at
its start and one at its end, and never a measured second: the first failure is logged once and
the record says the view was unavailable, and why.

An engine that runs the model in this process and reports its runtime's statistics
(``ReportsIterationStats``: the ``trtllm`` engine) has no page: ``EngineWatch`` drains those
statistics instead, on the run's event loop, at the same moments, into the same history, and the
section is summed up alike (``url`` ``IN_PROCESS``). Its runtime counts no tokens, so there is no
truth check then, only the running and waiting requests and the KV-cache usage.

The truth check compares the two counts over the same stretch of time, so that a window edge
cutting requests in flight cuts both alike: between two readings of the page, the output tokens
the server counted (a counter delta, restarts undone) against the output tokens the client
received (every arrival time, ``runner.results.window.tokens_between``). A reading stands for
the moment midway through its request. Readings inside the window are used; a reading before
the window stands for its start when nothing of the run had been sent yet (no warm-up), and one
after it for its end when every request had finished (a requests-bounded run): then the
comparison covers the whole window. Otherwise it covers the stretch between the first and last
readings inside it (``interval_s``, ``coverage``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rackscope.engine_metrics.history import (
    Counts,
    ReadingHistory,
    Sample,
    counter_delta,
    gauge_stats,
    histogram_delta,
    histogram_quantile,
)
from rackscope.engine_metrics.scraper import EngineScraper, metrics_url
from rackscope.errors import RackscopeError
from rackscope.jsontypes import JsonDict
from rackscope.runner.results.window import Phase, tokens_between
from rackscope.urls import redact_url

if TYPE_CHECKING:
    from rackscope.runner.config import RunConfig
    from rackscope.runner.engines.base import Engine, ReportsIterationStats
    from rackscope.runner.results.record import RunResult

log = logging.getLogger(__name__)

INTERVAL_S = 1.0  # one reading a second, as the agent reads it
DEADLINE_S = 1.0  # a whole read; a healthy page renders in milliseconds
DRAIN_DEADLINE_S = 5.0  # a whole drain of an in-process engine's statistics (a hung runtime)
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
IN_PROCESS = "in-process"  # the section's url when the engine itself is read, not a page
NO_STATS = "the engine reported no runtime statistics during the run"


def page_url(config: RunConfig) -> str | None:
    """The page a run reads, or None when it reads none (another engine, ``--no-engine-metrics``)."""
    if config.engine != "openai" or config.engine_metrics_off or not config.url:
        return None
    return config.engine_metrics or metrics_url(config.url)


class ServerWatch:
    """Reads one server's page around and during a run, into a ``ReadingHistory``; the record's
    ``server`` section is summed up from that history (``section``). ``EngineWatch`` fills the
    same history from an in-process engine instead."""

    def __init__(
        self, url: str, *, model: str | None, clock: Callable[[], float],
        interval_s: float = INTERVAL_S, deadline_s: float = DEADLINE_S,
    ) -> None:
        self._view(redact_url(url), model)  # the URL as shown and recorded
        self._page = url  # as read
        self._clock = clock
        self._deadline_s = deadline_s
        # The run's engine clock: reading times and the client's arrival times compare directly.
        self.scraper = EngineScraper(
            url, model=model, interval_s=interval_s, deadline_s=deadline_s, clock=clock,
            on_reading=self.history.add, log_failures="first",
        )
        self._edge: EngineScraper | None = None
        self.started = False

    def _view(self, url: str, model: str | None) -> None:
        """What every watch has: where it reads (as recorded) and the history it fills."""
        self.url = url
        self.history = ReadingHistory(model)

    async def start(self) -> None:
        """One reading now, before any request of the run goes out, then one a second."""
        await self._read(self.scraper)
        self.scraper.start()
        self.started = True

    async def _read(self, scraper: EngineScraper) -> None:
        """One read on a thread of its own. Boundary: the view is an addition to the run, and a
        bug in reading it must not end the run (the scraper's own thread guards itself alike)."""
        try:
            await asyncio.to_thread(scraper.scrape_once)
        except Exception:
            log.exception("reading the server's metrics page at %s failed unexpectedly", self.url)

    async def stop(self, *, read_again: bool) -> None:
        """Stop the reads; with ``read_again``, read once more (the window's end) when the page
        has been readable at all."""
        if self.started:
            await asyncio.to_thread(self.scraper.stop, 0.5)
        if read_again and self.history.readings:
            # The periodic scraper's stop flag is set: a fresh one of the same format reads last.
            self._edge = EngineScraper(
                self._page, fmt=self.scraper.format, model=self.history.model,
                deadline_s=self._deadline_s, clock=self._clock, on_reading=self.history.add, log_failures="first",
            )
            await self._read(self._edge)

    @property
    def scrapes(self) -> int:
        return self.scraper.snapshot().scrapes + (self._edge.snapshot().scrapes if self._edge else 0)

    @property
    def failures(self) -> int:
        return self.scraper.snapshot().failures + (self._edge.snapshot().failures if self._edge else 0)

    @property
    def last_error(self) -> str | None:
        return (self._edge.last_error if self._edge else None) or self.scraper.last_error

    def section(self, phases: Sequence[Phase], *, cold_start: bool) -> JsonDict:
        """The record's ``server`` section for a run made of ``phases``. ``cold_start``: nothing
        of the run was sent before the first window opened (no warm-up)."""
        try:
            return server_section(
                self.history, phases, url=self.url, cold_start=cold_start,
                scrapes=self.scrapes, failures=self.failures, last_error=self.last_error,
            )
        except Exception:  # boundary: the run's record is written whatever becomes of its view
            log.exception("summing up the server's view of the run failed")
            return unavailable(self.url, error="internal error while summing up the readings (see the log)",
                               scrapes=self.scrapes, failures=self.failures)


class EngineWatch(ServerWatch):
    """The server view of an engine that runs the model in this process
    (``ReportsIterationStats``): no page to read, so a task on the run's event loop drains the
    engine's runtime statistics once before the run, about once a second during it, and once
    after it when that reading can stand for the window's end, each stamped with the engine's
    clock when the drain ends. A drain that fails (the runtime raising, statistics turned off)
    is logged the first time and counted; a view never read is recorded as unavailable, with
    the last failure. The run goes on either way. The section's ``url`` is ``IN_PROCESS``."""

    def __init__(
        self, engine: ReportsIterationStats, *, model: str | None, clock: Callable[[], float],
        interval_s: float = INTERVAL_S,
    ) -> None:
        # Not ServerWatch.__init__: nothing of a page (scraper, deadline) applies here.
        self._view(IN_PROCESS, model)
        self._engine = engine
        self._clock = clock
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._scrapes = 0
        self._failures = 0
        self._last_error: str | None = None
        self.started = False

    async def start(self) -> None:
        await self.read_once()
        self._task = asyncio.create_task(self._every_interval(), name="rackscope-engine-stats")
        self.started = True

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.read_once()

    async def read_once(self) -> None:
        """Drain the engine's statistics into the history. Boundary: whatever the runtime
        raises is a failure of the view, never of the run (cancellation passes)."""
        try:
            # asyncio.timeout, not wait_for: before Python 3.12 wait_for can lose the stop's cancel.
            async with asyncio.timeout(DRAIN_DEADLINE_S):
                reading = await self._engine.iteration_reading()
        except TimeoutError:
            if self._failed(f"the engine's runtime statistics took over {DRAIN_DEADLINE_S:g} s to drain"):
                log.warning("the engine's runtime statistics are unavailable: %s", self._last_error)
            return
        except Exception as exc:
            if self._failed(str(exc) or type(exc).__name__):
                # A traceback only for what the engine did not report as its own error (a bug).
                log.warning("the engine's runtime statistics are unavailable: %s", self._last_error,
                            exc_info=not isinstance(exc, RackscopeError))
            return
        self._scrapes += 1
        if reading is not None:
            self.history.add(self._clock(), reading)

    def _failed(self, error: str) -> bool:
        """Count a failed drain; True for the first (the one logged)."""
        self._failures += 1
        self._scrapes += 1
        self._last_error = error
        return self._failures == 1

    async def stop(self, *, read_again: bool) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})  # the task's end; a cancel of this stop still goes through
        if read_again and self.history.readings:
            await self.read_once()

    @property
    def scrapes(self) -> int:
        return self._scrapes

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def last_error(self) -> str | None:
        return self._last_error or (None if self.history.readings else NO_STATS)


# --- the section -------------------------------------------------------------------------------
@dataclass
class _Stretch:
    """The part of one window both counts cover: between readings ``a`` and ``b``."""

    a: Sample
    b: Sample
    client_output_tokens: float


def _stretch(samples: Sequence[Sample], phase: Phase, *, before_ok: bool, after_ok: bool) -> _Stretch | None:
    start, end = phase.start_s, phase.end_s
    inside = [s for s in samples if start <= s.t <= end]
    first = inside[0] if inside else None
    last = inside[-1] if inside else None
    if before_ok:
        earlier = [s for s in samples if s.t < start]
        first = earlier[-1] if earlier else first
    if after_ok:
        later = [s for s in samples if s.t > end]
        last = later[0] if later else last
    if first is None or last is None or last.t <= first.t:
        return None
    records = [*phase.records, *(rec for rec, _ in phase.carried)]
    client = math.fsum(tokens_between(rec, first.t, last.t) for rec in records)
    return _Stretch(first, last, client)


def _sum(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else math.fsum(v for v in values if v is not None)


def _histogram_json(parts: Sequence[Counts | None]) -> JsonDict | None:
    """Quantiles of a histogram's counts over the stretches (None unless every stretch has it, in
    the same buckets)."""
    if not parts or any(p is None for p in parts):
        return None
    total: Counts | None = parts[0]
    for part in parts[1:]:
        if total is None or part is None:
            return None
        total = total.plus(part)
    if total is None or total.count <= 0:
        return None
    out: JsonDict = {"count": round(total.count), "mean": total.sum / total.count}
    for key, q in QUANTILES:
        out[key] = histogram_quantile(q, total.bounds, total.counts)
    return out


def _gauge_json(stats: tuple[float, float] | None) -> JsonDict | None:
    return None if stats is None else {"mean": stats[0], "max": stats[1]}


def unavailable(url: str, *, error: str, scrapes: int = 0, failures: int = 0) -> JsonDict:
    """The section of a run whose server view is unavailable (every figure null)."""
    return {
        "available": False, "url": url, "error": error, "format": None, "model": None,
        "samples": 0, "scrapes": scrapes, "failures": failures, "resets": 0,
        "interval_s": None, "coverage": None, "input_tokens": None, "output_tokens": None,
        "running_requests": None, "waiting_requests": None, "kv_cache_usage": None,
        "ttft_s": None, "itl_s": None, "truth_check": None,
    }


def server_section(
    history: ReadingHistory, phases: Sequence[Phase], *, url: str, cold_start: bool,
    scrapes: int, failures: int, last_error: str | None,
) -> JsonDict:
    """What the server counted over the run's windows, and the truth check (see the module)."""
    if not history.readings:
        return unavailable(url, error=last_error or "the metrics page was never read", scrapes=scrapes,
                           failures=failures)
    samples = history.samples()
    stretches: list[_Stretch] = []
    for i, phase in enumerate(phases):
        last = i == len(phases) - 1
        stretch = _stretch(
            samples, phase, before_ok=i == 0 and cold_start,
            after_ok=last and phase.complete and phase.stop_reason == "requests",
        )
        if stretch is not None:
            stretches.append(stretch)
    window_s = math.fsum(p.duration_s for p in phases)
    inside = [s for s in samples if any(p.start_s <= s.t <= p.end_s for p in phases)]
    section: JsonDict = {
        "available": True, "url": url, "error": None, "format": history.format.value if history.format else None,
        "model": history.model_seen, "samples": history.readings, "scrapes": scrapes, "failures": failures,
        "resets": history.resets,
        "running_requests": _gauge_json(gauge_stats([s.running for s in inside])),
        "waiting_requests": _gauge_json(gauge_stats([s.waiting for s in inside])),
        "kv_cache_usage": _gauge_json(gauge_stats([s.kv_cache_usage for s in inside])),
    }
    if history.model_seen is None:
        on_page = ", ".join(history.models_on_page) or "none"
        section["error"] = f"the page has no series of model {history.model!r} (models on it: {on_page})"
    interval = math.fsum(s.b.t - s.a.t for s in stretches)
    if not stretches:
        section["error"] = section["error"] or "fewer than two readings of the page fall in the measured window"
    server_out = _sum([counter_delta(s.a.output_tokens, s.b.output_tokens) for s in stretches])
    section |= {
        "interval_s": interval if stretches else None,
        "coverage": min(1.0, interval / window_s) if stretches and window_s > 0 else None,
        "input_tokens": _sum([counter_delta(s.a.input_tokens, s.b.input_tokens) for s in stretches]),
        "output_tokens": server_out,
        "ttft_s": _histogram_json([histogram_delta(s.a.ttft_s, s.b.ttft_s) for s in stretches]),
        "itl_s": _histogram_json([histogram_delta(s.a.itl_s, s.b.itl_s) for s in stretches]),
        "truth_check": _truth_check(stretches, interval, server_out),
    }
    return section


def _truth_check(stretches: Sequence[_Stretch], interval: float, server_out: float | None) -> JsonDict | None:
    if not stretches or interval <= 0 or server_out is None:
        return None
    client = math.fsum(s.client_output_tokens for s in stretches)
    return {
        "interval_s": interval,
        "client_output_tokens": client,
        "server_output_tokens": server_out,
        "client_output_tokens_per_s": client / interval,
        "server_output_tokens_per_s": server_out / interval,
        # Signed: positive when the client counted more than the server did.
        "relative_difference": (client - server_out) / server_out if server_out > 0 else None,
    }


# --- one line of it, for the terminal and the report ---------------------------------------------
def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _text(value: object, limit: int = 160) -> str:
    """A string of a record as a line may show it: printable, bounded."""
    text = value if isinstance(value, str) else ""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(section: object) -> list[str]:
    """The server view in a few words per line (a record from a file: every field checked)."""
    if not isinstance(section, dict):
        return []
    if section.get("available") is not True:
        return [f"unavailable: {_text(section.get('error')) or 'no reading'}"]
    samples = _number(section.get("samples"))
    head = f"{_text(section.get('format'), 16) or '?'}, {int(samples or 0):,} readings"
    cover = _number(section.get("coverage"))
    if cover is not None:
        head += f" covering {cover * 100:.0f} % of the window"
    lines = [head]
    truth = section.get("truth_check")
    if isinstance(truth, dict):
        client = _number(truth.get("client_output_tokens_per_s"))
        server = _number(truth.get("server_output_tokens_per_s"))
        diff = _number(truth.get("relative_difference"))
        if client is not None and server is not None:
            lines.append(
                f"output tokens/s: server {server:,.1f}, client {client:,.1f}"
                + (f" ({diff * 100:+.2f} %)" if diff is not None else "")
            )
    elif section.get("error"):
        lines.append(_text(section.get("error")))
    latency = []
    for key, name in (("ttft_s", "TTFT"), ("itl_s", "ITL")):
        d = section.get(key)
        if isinstance(d, dict):
            p50, p99 = _number(d.get("p50")), _number(d.get("p99"))
            if p50 is not None and p99 is not None:
                latency.append(f"{name} p50/p99 {p50 * 1e3:,.1f} / {p99 * 1e3:,.1f} ms")
    if latency:
        lines.append("; ".join(latency) + " (server buckets)")
    gauges = []
    for key, name, scale, unit in (("running_requests", "running", 1.0, ""), ("waiting_requests", "waiting", 1.0, ""),
                                   ("kv_cache_usage", "KV cache", 100.0, " %")):
        d = section.get(key)
        if isinstance(d, dict):
            mean, peak = _number(d.get("mean")), _number(d.get("max"))
            if mean is not None and peak is not None:
                gauges.append(f"{name} {mean * scale:,.1f}{unit} (max {peak * scale:,.1f}{unit})")
    if gauges:
        lines.append(", ".join(gauges))
    return lines


__all__ = ["IN_PROCESS", "EngineWatch", "ServerWatch", "describe", "page_url", "server_section", "unavailable"]


async def watch_run(config: RunConfig, engine: Engine, page: str | None = None) -> ServerWatch | None:
    """Start the server's view of a run: an in-process engine's own runtime statistics
    (``ReportsIterationStats``), else the server's metrics page of an openai run (unless turned
    off): ``page`` when the host names one (an agent's ``--engine-metrics``), else ``page_url``."""
    from rackscope.runner.engines.base import ReportsIterationStats

    watch: ServerWatch
    if isinstance(engine, ReportsIterationStats):
        watch = EngineWatch(engine, model=engine.model or config.model, clock=engine.now, interval_s=INTERVAL_S)
        await watch.start()
        return watch
    url = page_url(config)
    if url is None:
        return None
    try:
        watch = ServerWatch(page or url, model=engine.model or config.model, clock=engine.now)
    except ValueError as exc:  # checked as a setting already; a URL the scraper cannot use is no view
        log.warning("not reading the server's metrics page: %s", exc)
        return None
    await watch.start()
    return watch


async def end_watch(watch: ServerWatch, config: RunConfig, result: RunResult | None) -> None:
    """Stop reading the page and put the server's view of the run into its result."""
    from rackscope.runner.scenarios import phase_specs
    from rackscope.runner.warmup import warmup_mode

    phases = result.phases if result is not None else []
    last = phases[-1] if phases else None
    # After a requests-bounded window nothing of the run is in flight: one more reading stands
    # for the window's end. After a duration the server may still be finishing cut requests.
    await watch.stop(read_again=last is not None and last.complete and last.stop_reason == "requests")
    if result is not None:
        specs = phase_specs(config)
        cold_start = bool(specs) and warmup_mode(config, specs[0]) == "none"
        result.server = watch.section(phases, cold_start=cold_start)
