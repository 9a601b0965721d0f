"""Run requests through several worker processes, each with its own event loop and engine.

One Python process streaming tokens tops out at one core. ``run_workers`` spreads a list of
requests over N processes (started with ``spawn``) and merges what they measured::

    from functools import partial
    from rackscope.runner.engines.openai import OpenAIEngine
    from rackscope.runner.workers import run_workers

    run = run_workers(
        requests,                                   # list[runner.engines.base.Request]
        partial(OpenAIEngine, "http://127.0.0.1:8000", "llama"),  # picklable, called in each worker
        workers=4,
        concurrency=256,                            # closed loop: 256 in flight in total
    )
    run.records        # list[RequestRecord] in request order, on one clock
    run.cpu_s          # client CPU seconds used by each worker
    run.interrupted    # True when SIGINT (or ``stop``) ended the run early

How the load is shared:

- Request ``i`` goes to worker ``i % workers``.
- ``concurrency=C`` (closed loop): worker ``w`` keeps ``C // workers`` requests in flight,
  plus one for the first ``C % workers`` workers. ``concurrency=None`` with no arrival
  schedule sends every request at once (offline).
- ``arrivals_s`` (open loop): request ``i`` starts ``arrivals_s[i]`` seconds after the common
  start, whatever is in flight; ``concurrency`` then caps what is in flight (shared likewise).
  Arrivals are kept to about a millisecond (uvloop's timer grain).

A burst (the first wave of a closed loop, or offline) is launched one request per loop
turn, so the first responses are read while the rest are still being sent rather than
after: no TTFT inflation from the client's own sending.

Every worker starts its engine (and opens its connections, for engines with ``prewarm``)
before the common start time, which the parent sets once all are ready, so no request pays
for process start-up or a TCP connect. Times are the engines' clocks; for the ``openai``
engine that is ``time.perf_counter()``, ``CLOCK_MONOTONIC`` on Linux, which is the same in
every process, so records from different workers compare directly.

While it runs, the parent sees what the workers have received so far: each worker sends its
finished records every ``FLUSH_INTERVAL_S`` (``on_records`` gets them as they come) and, in
the same step, writes the output tokens its requests still in flight have received into its
slot of a shared-memory array (``LiveTokens``, read by the parent from any thread; an engine
that ``CountsLiveTokens`` says how many). A request leaves its worker's live count before its
record is sent, so a reader that adds records and live counts may be one flush low, never
twice high. ``on_progress`` gets a ``WorkerProgress`` about once a second.

Cancellation: SIGINT to the parent (or setting ``stop``) stops the workers; requests in
flight are recorded as failed with ``error_type="cancelled"``, requests not yet started are
left out, and ``run_workers`` returns what was recorded with ``interrupted=True``. The
workers ignore SIGINT themselves, so a terminal's Ctrl-C, which reaches the whole process
group, goes through the parent. Call ``run_workers`` from the main thread (it installs its
SIGINT handler there) or pass ``stop`` and set it from elsewhere.

``collect(engine, request)`` turns one request into a ``RequestRecord`` with any engine (the
single-process path uses it too): it takes the engine's lean ``record()`` when it has one
and otherwise consumes ``stream()``. ``new_event_loop()`` gives uvloop's loop when uvloop is
installed (it halves the client's CPU per token), else asyncio's; ``run_client(coro)`` runs a
load-generating process's main coroutine on it with the garbage collector kept quiet
(``quiet_gc``), as every worker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any, TypeVar, cast

from rackscope.errors import EngineUnavailable, RunError
from rackscope.runner.engines.base import (
    CountsLiveTokens,
    Done,
    Engine,
    Failed,
    FirstToken,
    Prewarms,
    RecordsWholeRequests,
    Request,
    Tokens,
)
from rackscope.runner.records import RequestRecord

if TYPE_CHECKING:
    # Imported where used: a single-process run (which takes new_event_loop from here) needs
    # none of multiprocessing.
    from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

T = TypeVar("T")

START_MARGIN_S = 0.05  # between "all workers ready" and the common start
FLUSH_INTERVAL_S = 0.25  # how often a worker sends its finished records and live count to the parent
PROGRESS_INTERVAL_S = 1.0  # how often the parent reports progress
# The youngest generation's collection threshold while a client runs (Python's default is 700).
# A run allocates a few dozen tracked objects per request and none per token, so young
# collections stay small either way; fewer of them means fewer pauses between reads.
CLIENT_GC_THRESHOLD = 10_000
STOP_POLL_S = 0.05  # how often a worker checks the stop flag
STOP_GRACE_S = 10.0  # how long the parent waits for workers to report after a stop
READY_TIMEOUT_S = 120.0  # engine start-up (server checks, connection warm-up) in a worker

EngineFactory = Callable[[], Engine]


@dataclass(slots=True)
class WorkerRun:
    """What ``run_workers`` measured."""

    records: list[RequestRecord]  # request order; requests never started are absent
    start_s: float  # the common start on the engines' clock
    end_s: float  # when the last worker finished, same clock
    cpu_s: list[float] = field(default_factory=list)  # client CPU seconds per worker
    interrupted: bool = False


@dataclass(frozen=True, slots=True)
class WorkerProgress:
    """What a worker run has done so far, for ``on_progress``."""

    elapsed_s: float  # since the common start
    requests_done: int  # finished ok
    requests_failed: int  # failed or stopped
    in_flight: int  # requests running in the workers at their last flush
    output_tokens: int  # of finished requests plus what those in flight have received (never decreasing)


class LiveTokens:
    """Output tokens received so far by the requests in flight, from shared-memory slots that
    each worker writes (every ``FLUSH_INTERVAL_S``, its own two: tokens and requests in flight)
    and anyone reads.

    Pass one to ``run_workers`` and read ``output_tokens()`` from any thread while it runs (a
    metrics collector's, say): it reads plain 64-bit integers, each written whole by one
    writer, and never blocks. Zero before the run starts and after it ends.
    """

    def __init__(self) -> None:
        self._slots: Any = None  # a multiprocessing RawArray("q", 2 * workers), set by run_workers

    def output_tokens(self) -> int:
        slots = self._slots
        return sum(slots[0::2]) if slots is not None else 0

    def in_flight(self) -> int:
        slots = self._slots
        return sum(slots[1::2]) if slots is not None else 0


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when installed (much cheaper per socket read), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector's pauses off a client's timestamps while it runs.

    What exists when it starts (modules, classes, the engine, the dataset) is frozen out of
    every later collection: a full collection would otherwise walk all of it, tens of
    milliseconds during which every token waiting on a socket gets a late timestamp. Young
    collections run less often (``CLIENT_GC_THRESHOLD``). Everything is put back on exit.
    """
    gc.collect()
    gc.freeze()
    threshold = gc.get_threshold()
    gc.set_threshold(CLIENT_GC_THRESHOLD, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def run_client(main: Coroutine[Any, Any, T]) -> T:
    """Run a load-generating process's main coroutine: on ``new_event_loop()``, with the
    garbage collector quiet (``quiet_gc``). For a process that is the client (a command, a
    worker), not for a host that runs other work beside it."""
    with quiet_gc(), asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


async def collect(engine: Engine, request: Request) -> RequestRecord:
    """Run one request to its end and return its record; never raises for request errors."""
    if isinstance(engine, RecordsWholeRequests):
        return await engine.record(request)
    rec = RequestRecord(request_id=request.request_id, start_s=engine.now(), input_tokens=request.input_tokens)
    arrivals: list[float] = []
    async for ev in engine.stream(request):
        if isinstance(ev, Tokens | FirstToken):
            arrivals.extend([ev.t] * ev.count)
        elif isinstance(ev, Done):
            rec.end_s = ev.t
            rec.ok = True
            rec.output_tokens = ev.output_tokens
            rec.output_tokens_method = ev.output_tokens_method
            rec.input_tokens = ev.input_tokens or rec.input_tokens
            rec.gpu = ev.gpu
        elif isinstance(ev, Failed):
            rec.end_s = ev.t
            rec.error_type = ev.error_type
            rec.error = ev.message
            rec.output_tokens = ev.output_tokens
    if arrivals:
        rec.first_token_s = arrivals[0]
        # One arrival only means the engine reports first and last token (TPOT stands in).
        rec.itl_s = [b - a for a, b in pairwise(arrivals)] if len(arrivals) > 1 else None
    return rec


def _share(total: int, workers: int, index: int) -> int:
    return total // workers + (1 if index < total % workers else 0)


# -- inside a worker process ----------------------------------------------------------------


async def _worker_async(
    index: int,
    conn: Connection,
    items: list[tuple[int, Request, float | None]],
    factory: EngineFactory,
    concurrency: int | None,
    stop: Any,  # multiprocessing Event (its type is not importable for annotations)
    live: Any,  # multiprocessing RawArray("q"): this worker writes live[2 * index] and the next
) -> None:
    loop = asyncio.get_running_loop()
    engine = factory()
    try:
        await engine.start()
        if isinstance(engine, Prewarms):
            await engine.prewarm(min(concurrency or len(items), len(items)))
    except Exception as exc:  # noqa: BLE001 - process boundary: the parent raises EngineUnavailable
        log.error("worker %d: engine did not start: %s", index, exc)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    live_tokens = engine.live_output_tokens if isinstance(engine, CountsLiveTokens) else None
    # Everything built so far (imports, engine, connections, requests) lives for the whole run:
    # out of every collection from here on (see quiet_gc).
    gc.collect()
    gc.freeze()
    conn.send(("ready", index))
    msg = await loop.run_in_executor(None, conn.recv)
    if msg[0] != "go":
        await engine.stop()
        conn.send(("done", time.process_time(), []))
        return
    start_s: float = msg[1]
    cpu0 = time.process_time()
    pending: list[tuple[int, RequestRecord]] = []
    # The task running each request, with what a "cancelled" record needs if it is stopped.
    in_flight: dict[asyncio.Task[Any], tuple[int, Request, float]] = {}
    runners: set[asyncio.Task[None]] = set()

    async def one(i: int, req: Request) -> None:
        task = asyncio.current_task()
        assert task is not None
        in_flight[task] = (i, req, engine.now())
        try:
            pending.append((i, await collect(engine, req)))
        finally:
            in_flight.pop(task, None)

    async def closed_loop(queue: list[tuple[int, Request, float | None]]) -> None:
        while queue:
            i, req, _ = queue.pop()
            await one(i, req)

    def spawn(coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = loop.create_task(coro)
        runners.add(task)
        task.add_done_callback(runners.discard)
        return task

    async def open_loop(sem: asyncio.Semaphore | None) -> None:
        for i, req, at in items:
            assert at is not None
            delay = start_s + at - engine.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is not None:
                await sem.acquire()
                spawn(one(i, req)).add_done_callback(lambda _t: sem.release())
            else:
                spawn(one(i, req))
            await asyncio.sleep(0)  # one launch per loop turn, as in the closed loop

    async def flusher() -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            # One step, nothing awaited in between: the live count leaves out exactly the
            # requests whose records go out now (see the module docstring).
            if live_tokens is not None:
                live[2 * index] = sum(live_tokens().values())
            live[2 * index + 1] = len(in_flight)
            if pending:
                conn.send(("records", pending[:]))
                pending.clear()

    # Timers may fire a little early (uvloop's are millisecond-grained): sleep most of the way,
    # then yield until the common start, so no request starts before it.
    await asyncio.sleep(max(0.0, start_s - engine.now() - 0.002))
    while engine.now() < start_s:  # noqa: ASYNC110 - a sub-millisecond wait for a time, not an event
        await asyncio.sleep(0)
    if items and items[0][2] is not None:
        spawn(open_loop(asyncio.Semaphore(concurrency) if concurrency else None))
    else:
        queue = items[::-1]  # pop() from the end takes requests in order
        for _ in range(min(concurrency or len(items), len(items))):
            spawn(closed_loop(queue))
            # One loop turn per launch, so that responses to the first requests are read as
            # they arrive instead of after all of a large burst has been sent.
            await asyncio.sleep(0)
    flush_task = loop.create_task(flusher())
    while runners:
        await asyncio.wait(set(runners), timeout=STOP_POLL_S)
        if stop.is_set():
            now = engine.now()
            for i, req, started in in_flight.values():
                cancelled = RequestRecord(
                    request_id=req.request_id,
                    start_s=started,
                    end_s=now,
                    input_tokens=req.input_tokens,
                    error_type="cancelled",
                    error="run stopped",
                )
                pending.append((i, cancelled))
            tasks = set(runners) | set(in_flight)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            break
    flush_task.cancel()
    cpu_s = time.process_time() - cpu0
    await engine.stop()
    live[2 * index] = live[2 * index + 1] = 0
    conn.send(("done", cpu_s, pending))


def _worker_main(
    index: int,
    conn: Connection,
    items: list[tuple[int, Request, float | None]],
    factory: EngineFactory,
    concurrency: int | None,
    stop: Any,
    cpu: int | None,
    live: Any,
) -> None:
    """Worker process entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    # The process is the client and nothing else: young collections less often, and (once the
    # engine is up, in _worker_async) the start-up heap frozen out of all of them.
    gc.set_threshold(CLIENT_GC_THRESHOLD, *gc.get_threshold()[1:])
    loop = new_event_loop()
    try:
        loop.run_until_complete(_worker_async(index, conn, items, factory, concurrency, stop, live))
    finally:
        loop.close()
        conn.close()


# -- in the parent --------------------------------------------------------------------------


def run_workers(
    requests: Sequence[Request],
    engine_factory: EngineFactory,
    workers: int,
    *,
    concurrency: int | None = None,
    arrivals_s: Sequence[float] | None = None,
    cpus: Sequence[int] | None = None,
    stop: threading.Event | None = None,
    live: LiveTokens | None = None,
    on_records: Callable[[list[RequestRecord]], None] | None = None,
    on_progress: Callable[[WorkerProgress], None] | None = None,
) -> WorkerRun:
    """Run ``requests`` over ``workers`` processes; see the module docstring.

    ``engine_factory`` is called once in each worker and must be picklable (a class or a
    ``functools.partial`` of one). ``cpus`` pins worker ``w`` to ``cpus[w % len(cpus)]``.
    While the run lasts, ``live`` counts the output tokens of requests in flight,
    ``on_records`` gets finished records as workers send them (every ``FLUSH_INTERVAL_S``;
    warm-up requests included) and ``on_progress`` a ``WorkerProgress`` about once a second;
    both are called in this thread. Raises ``EngineUnavailable`` when a worker's engine
    cannot start and ``RunError`` when a worker dies.
    """
    import multiprocessing as mp

    if workers < 1:
        raise ValueError("workers must be at least 1")
    if concurrency is not None and concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if arrivals_s is not None and len(arrivals_s) != len(requests):
        raise ValueError("arrivals_s needs one offset per request")
    workers = max(1, min(workers, len(requests)))
    if not requests:
        now = time.perf_counter()
        return WorkerRun([], now, now)
    if concurrency is not None:
        workers = min(workers, concurrency)
    ctx = mp.get_context("spawn")
    stop_flag = ctx.Event()
    slots = ctx.RawArray("q", 2 * workers)
    procs: list[Any] = []
    conns: list[Connection] = []
    for w in range(workers):
        items = [
            (i, requests[i], None if arrivals_s is None else float(arrivals_s[i]))
            for i in range(w, len(requests), workers)
        ]
        share = None if concurrency is None else _share(concurrency, workers, w)
        cpu = None if not cpus else cpus[w % len(cpus)]
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(
            target=_worker_main,
            args=(w, child_end, items, engine_factory, share, stop_flag, cpu, slots),
            name=f"rackscope-worker-{w}",
            daemon=True,
        )
        proc.start()
        child_end.close()
        procs.append(proc)
        conns.append(parent_end)

    interrupted = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda _sig, _frame: interrupted.set())
    live = live if live is not None else LiveTokens()
    live._slots = slots
    try:
        return _supervise(procs, conns, stop_flag, interrupted, stop, len(requests), on_records, on_progress, live)
    finally:
        live._slots = None
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        for proc in procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
        for c in conns:
            c.close()


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    """Send to a worker that may already have exited. A worker whose engine failed, or that
    died, closes its end at any moment; what it said (or its exit) is read on the other side
    of the pipe and reported from there, so a failed send here is expected, not an error."""
    try:
        conn.send(message)
    except OSError:  # BrokenPipeError, ConnectionResetError: the worker is gone
        log.debug("worker gone before %r could be sent", message[0])


def _supervise(
    procs: list[Any],
    conns: list[Connection],
    stop_flag: Any,
    interrupted: threading.Event,
    stop: threading.Event | None,
    n_requests: int,
    on_records: Callable[[list[RequestRecord]], None] | None,
    on_progress: Callable[[WorkerProgress], None] | None,
    live: LiveTokens,
) -> WorkerRun:
    from multiprocessing.connection import wait

    def stopping() -> bool:
        return interrupted.is_set() or (stop is not None and stop.is_set())

    # Phase 1: every worker reports ready (engine started, connections open).
    ready: set[int] = set()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(ready) < len(conns):
        if stopping():
            for c in conns:
                _send(c, ("abort",))
            stop_flag.set()
            now = time.perf_counter()
            return WorkerRun([], now, now, interrupted=True)
        if time.monotonic() > deadline:
            raise RunError(f"workers not ready after {READY_TIMEOUT_S:g} s")
        for got in wait([c for i, c in enumerate(conns) if i not in ready], timeout=0.1):
            c = cast("Connection", got)
            w = conns.index(c)
            try:
                msg = c.recv()
            except EOFError:
                raise RunError(f"worker {w} exited while starting (exit code {procs[w].exitcode})") from None
            if msg[0] == "error":
                for other in conns:
                    if other is not c:
                        _send(other, ("abort",))
                raise EngineUnavailable(f"worker {w} could not start its engine: {msg[1]}")
            ready.add(w)

    start_s = time.perf_counter() + START_MARGIN_S
    for c in conns:
        _send(c, ("go", start_s))  # one that died since it was ready is reported below

    # Phase 2: gather records until every worker says done.
    by_index: dict[int, RequestRecord] = {}
    cpu_s = [0.0] * len(conns)
    open_conns = dict(enumerate(conns))
    stop_sent_s = math.inf
    done = failed = finished_tokens = reported_tokens = 0
    next_progress_s = start_s + PROGRESS_INTERVAL_S

    def take(batch: list[tuple[int, RequestRecord]]) -> None:
        nonlocal done, failed, finished_tokens
        by_index.update(batch)
        records = [rec for _, rec in batch]
        for rec in records:
            finished_tokens += rec.output_tokens
            if rec.ok:
                done += 1
            else:
                failed += 1
        if on_records is not None and records:
            on_records(records)

    while open_conns:
        now = time.perf_counter()
        if on_progress is not None and now >= next_progress_s:
            next_progress_s = max(next_progress_s + PROGRESS_INTERVAL_S, now)
            # A worker's live count drops a moment before its records arrive here: report the
            # highest total seen, so the figure never steps back.
            reported_tokens = max(reported_tokens, finished_tokens + live.output_tokens())
            on_progress(WorkerProgress(now - start_s, done, failed, live.in_flight(), reported_tokens))
        if stopping() and not stop_flag.is_set():
            stop_flag.set()
            stop_sent_s = time.monotonic()
        if time.monotonic() - stop_sent_s > STOP_GRACE_S:
            log.warning("workers did not finish within %.0f s of the stop; dropping them", STOP_GRACE_S)
            break
        for got in wait(list(open_conns.values()), timeout=0.1):
            c = cast("Connection", got)
            w = conns.index(c)
            try:
                msg = c.recv()
            except EOFError:
                del open_conns[w]
                if not stop_flag.is_set():
                    stop_flag.set()
                    raise RunError(f"worker {w} died (exit code {procs[w].exitcode})") from None
                continue
            if msg[0] == "records":
                take(msg[1])
            elif msg[0] == "done":
                cpu_s[w] = msg[1]
                take(msg[2])
                del open_conns[w]
    end_s = time.perf_counter()
    records = [by_index[i] for i in sorted(by_index)]
    if len(records) < n_requests and not stop_flag.is_set():
        raise RunError(f"workers returned {len(records)} of {n_requests} records")
    return WorkerRun(records, start_s, end_s, cpu_s, interrupted=stop_flag.is_set())


__all__ = [
    "LiveTokens", "WorkerProgress", "WorkerRun", "collect", "new_event_loop", "quiet_gc", "run_client", "run_workers",
]
