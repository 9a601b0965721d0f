"""``SimEngine``: the Engine protocol and its capabilities over the batch scheduler, and time (wall or virtual)."""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import random
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence

from rackscope.clock import Clock, VirtualClock
from rackscope.errors import EngineError, EngineUnavailable
from rackscope.runner.engines.base import (
    CountsLiveTokens,
    Done,
    EngineEvent,
    EngineStats,
    EventSink,
    Failed,
    GpuStats,
    HasGpus,
    HintsInflight,
    ReportsStats,
    Request,
    Slowable,
    SubmitsCallbacks,
    VirtualTime,
)
from rackscope.runner.engines.sim.deployment import (
    DEFAULT_MAX_NUM_TOKENS,
    KV_BYTES_PER_TOKEN,
    LLAMA2_MAX_SEQ_LEN,
    Deployment,
    deployment_for,
)
from rackscope.runner.engines.sim.jobs import EventChannel, JobState, SimJob
from rackscope.runner.engines.sim.scheduler import BatchScheduler, GpuWorker
from rackscope.simgpu import SimGpu

log = logging.getLogger(__package__)  # the package's name, like every module of the engine

CHARS_PER_TOKEN = 4  # prompt length estimate when only text is given
TIMER_SLACK_S = 1e-6  # wall clock: asyncio may fire a timer up to its clock resolution early


class SimEngine(
    BatchScheduler, SubmitsCallbacks, CountsLiveTokens, VirtualTime, ReportsStats, HintsInflight, Slowable, HasGpus
):
    """Continuous batching on simulated GPUs, one iteration loop per GPU, one shared queue.

    Each request is served by one GPU (``Done.gpu``). Requests go to whichever GPU next has
    room, so faster GPUs serve more. ``engine_slowdown`` (>= 1 slows down) can be changed at
    any time, as can every fault of the GPUs. A dropped GPU fails its requests with
    ``error_type="engine"`` at the end of its iteration in progress and takes no new ones
    until it is back.
    """

    name = "sim"

    def __init__(
        self,
        gpus: list[SimGpu],
        clock: Clock,
        model: str = "llama2-70b",
        *,
        max_batch: int | None = None,
        max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS,
        max_seq_len: int = LLAMA2_MAX_SEQ_LEN,
        engine_slowdown: float = 1.0,
        warm_start: bool = False,
        seed: int = 0,
    ) -> None:
        if not gpus:
            raise EngineUnavailable("the simulated engine needs at least one GPU")
        if (max_batch is not None and max_batch < 1) or max_num_tokens < 1 or max_seq_len < 2:
            raise ValueError("max_batch, max_num_tokens and max_seq_len must be positive")
        self.model = model
        self.max_num_tokens = max_num_tokens
        self.max_seq_len = max_seq_len
        self._clock = clock
        self._virtual = isinstance(clock, VirtualClock)
        deployments: dict[str, Deployment] = {}
        for gpu in gpus:
            if gpu.profile.key not in deployments:
                deployments[gpu.profile.key] = deployment_for(gpu.profile)
        # max_batch defaults to what each GPU's deployment is tuned for.
        self._workers = [GpuWorker(gpu, deployments[gpu.profile.key], max_batch) for gpu in gpus]
        self._max_kv_tokens = max(w.kv_capacity for w in self._workers)
        self._slowdown = 1.0
        self.engine_slowdown = engine_slowdown
        self._queue: deque[SimJob] = deque()
        self._queued = 0
        self._idle: list[GpuWorker] = []
        self._dead: list[GpuWorker] = []
        self._heap: list[tuple[float, int, GpuWorker]] = []
        self._seq = 0
        self._kick_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._started = False
        self._stopped = False
        self._streams = 0  # live stream() readers, which must run between virtual iterations
        # Warm start: each GPU's first batch starts part-way through its generation, as if the
        # engine had been serving for a while. A cold offline start fills every batch at once
        # and then decodes in lockstep, so throughput swings for minutes before it settles;
        # demos and continuous workloads want the steady state from the first second.
        self.warm_start = warm_start
        self._rng = random.Random(seed)

    # --- Engine protocol ---------------------------------------------------------------------
    def now(self) -> float:
        return self._clock.now()

    @property
    def engine_slowdown(self) -> float:
        """Factor on every iteration's duration: 2.0 halves throughput. Takes effect next step."""
        return self._slowdown

    @engine_slowdown.setter
    def engine_slowdown(self, factor: float) -> None:
        if not factor > 0 or math.isinf(factor):
            raise ValueError(f"engine_slowdown must be a positive finite factor, got {factor!r}")
        self._slowdown = float(factor)

    @property
    def started(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._started and not self._stopped

    @property
    def gpus(self) -> list[SimGpu]:
        return [w.gpu for w in self._workers]

    def deployment(self, gpu_index: int = 0) -> Deployment:
        """The memory and cost model of the engine's ``gpu_index``-th GPU."""
        return self._workers[gpu_index].deploy

    async def start(self) -> None:
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        for w in self._workers:
            w.gpu.weights_bytes = w.deploy.weights_bytes
            w.gpu.set_load(0.0, kv_bytes=0, nvlink_tx_bytes_per_s=0.0, nvlink_rx_bytes_per_s=0.0)
            if w.gpu.faults.dropped:
                w.dead = True
                self._dead.append(w)
            else:
                w.idle = True
                self._idle.append(w)
        self._started = True
        log.info(
            "simulated engine %s on %d x %s (%s weights, %d KV tokens per GPU)",
            self.model, len(self._workers), self._workers[0].gpu.profile.name,
            self._workers[0].deploy.precision, self._workers[0].kv_capacity,
        )

    async def stop(self) -> None:
        """Fail everything in flight with ``error_type="cancelled"`` and unload the model."""
        if not self._started or self._stopped:
            return
        t = self._halt("cancelled", "engine stopped")
        for w in self._workers:
            self._reset_worker(w)
            w.gpu.weights_bytes = 0
        self._fail_queue(t, "cancelled", "engine stopped")
        self._heap.clear()

    async def stream(self, request: Request) -> AsyncGenerator[EngineEvent, None]:
        """Events of one request. ``request.extra["stream_tokens"]`` asks for ``Tokens`` events."""
        channel = EventChannel()
        job = self.submit(request, channel.push, stream_tokens=bool(request.extra.get("stream_tokens", False)))
        finished = False
        self._streams += 1
        try:
            while True:
                for event in await channel.drain():
                    finished = type(event) is Done or type(event) is Failed
                    yield event
                    if finished:
                        return
        finally:
            self._streams -= 1
            if not finished:
                job.cancel()

    # --- fast path ---------------------------------------------------------------------------
    def submit(self, request: Request, on_event: EventSink, *, stream_tokens: bool = False) -> SimJob:
        """Queue a request; ``on_event`` is called from the engine with each event.

        The callback runs inside the engine's iteration processing: it should only record or
        hand the event on. Cheaper than ``stream()`` (no task wake-up per event), which is what
        a whole simulated rack in one process needs.
        """
        now = self._clock.now()
        input_tokens = _input_tokens(request)
        job = SimJob(self, request.request_id, input_tokens, request.max_output_tokens, now, on_event, stream_tokens)
        error = None
        if not self._started or self._stopped:
            error = "engine is not running"
        elif request.max_output_tokens < 1:
            error = f"max_output_tokens must be at least 1, got {request.max_output_tokens}"
        elif job.reserve_tokens > self.max_seq_len:
            error = f"{input_tokens} prompt + {job.output_tokens} output tokens exceed the {self.max_seq_len} context"
        elif job.reserve_tokens > self._max_kv_tokens:
            error = f"request needs {job.reserve_tokens} KV tokens, more than a GPU holds ({self._max_kv_tokens})"
        else:
            if self._dead:
                self._revive()
            if len(self._dead) == len(self._workers):
                error = "no GPU is available (all dropped)"
        if error is not None:
            job.state = JobState.FAILED
            job.emit(Failed(now, "engine", error))
            return job
        self._queue.append(job)
        self._queued += 1
        if self._idle and not self._kick_pending:
            self._kick_pending = True
            if not self._virtual:
                assert self._loop is not None
                self._loop.call_soon(self._guarded, self._kick)
        return job

    def live_output_tokens(self) -> dict[int | None, int]:
        """Output tokens generated so far by the requests decoding on each GPU: one stored
        figure per GPU, updated with every change, so a collector thread reads it safely."""
        return {w.gpu.index: live for w in self._workers if (live := w.live) > 0}

    def stats(self) -> EngineStats:
        gpus = tuple(
            GpuStats(
                gpu=w.gpu.index,
                running=w.running,
                prefilling=sum(1 for j in w.prefill if j.state is JobState.PREFILL),
                kv_used_tokens=w.kv_used,
                kv_capacity_tokens=w.kv_capacity,
                kv_used_bytes=w.kv_used * KV_BYTES_PER_TOKEN,
                output_tokens=w.output_tokens,
                input_tokens=w.input_tokens,
                requests_done=w.requests_done,
                requests_failed=w.requests_failed,
                dropped=w.gpu.faults.dropped,
            )
            for w in self._workers
        )
        return EngineStats(queued=self._queued, gpus=gpus)

    @property
    def max_inflight(self) -> int:
        """Requests that keep every GPU's batch full with as many again queued behind."""
        return 2 * sum(w.max_batch for w in self._workers)

    @property
    def available(self) -> bool:
        """False when every GPU has dropped out."""
        return any(not w.gpu.faults.dropped for w in self._workers)

    # --- virtual time ------------------------------------------------------------------------
    def _virtual_clock(self) -> VirtualClock:
        if not isinstance(self._clock, VirtualClock):
            raise EngineError("run_until/step need the engine to run on a VirtualClock")
        return self._clock

    async def step(self) -> bool:
        """Move the virtual clock to the next iteration end and process it; False when idle."""
        clock = self._virtual_clock()
        await asyncio.sleep(0)  # let readers submit at the current time
        if self._kick_pending:
            self._kick()
        while self._heap:
            end, seq, w = heapq.heappop(self._heap)
            if seq != w.seq:
                continue
            clock.set(max(end, clock.now()))
            self._end_step(w, end)
            return True
        return False

    async def run_until(self, t_s: float) -> None:
        """Process every iteration ending at or before ``t_s``, then set the clock to ``t_s``."""
        clock = self._virtual_clock()
        await asyncio.sleep(0)
        if self._kick_pending:
            self._kick()
        heap = self._heap
        while heap and heap[0][0] <= t_s:
            end, seq, w = heapq.heappop(heap)
            if seq != w.seq:
                continue
            clock.set(max(end, clock.now()))
            self._end_step(w, end)
            if self._streams:
                await asyncio.sleep(0)
            if self._kick_pending:
                self._kick()
        if t_s > clock.now():
            clock.set(t_s)

    async def run_for(self, dt_s: float) -> None:
        await self.run_until(self._clock.now() + dt_s)

    async def run_until_idle(self, limit_s: float = math.inf) -> None:
        """Run until nothing is queued or in flight (or the clock reaches ``limit_s``)."""
        while await self.step():
            if self._clock.now() >= limit_s:
                return

    @property
    def next_event_s(self) -> float:
        """When this engine's next iteration ends (``inf`` when idle)."""
        heap = self._heap
        while heap and heap[0][1] != heap[0][2].seq:  # drop entries of abandoned iterations
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    # --- wall clock --------------------------------------------------------------------------
    def _arm(self) -> None:
        """Keep one timer set for the earliest iteration end."""
        if self._virtual or self._stopped or not self._heap:
            return
        end = self._heap[0][0]
        if self._timer is not None:
            if self._timer_at <= end:
                return
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_later(max(0.0, end - self._clock.now()), self._guarded, self._on_timer)
        self._timer_at = end

    def _guarded(self, callback: Callable[[], None]) -> None:
        """Run a timer callback. Boundary: a bug here would otherwise stop time silently and
        leave every reader waiting forever, so it fails what is in flight and says why."""
        try:
            callback()
        except Exception as exc:
            log.exception("the simulated engine failed; failing every request in flight")
            self._crash(f"simulated engine failed: {type(exc).__name__}: {exc}")

    def _halt(self, error_type: str, message: str) -> float:
        """Stop iterating and fail every request in flight with what it had; returns now."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        t = self._clock.now()
        for w in self._workers:
            for job in w.in_flight():
                self._abort(job, Failed(t, error_type, message, w.generated(job)))
        return t

    def _crash(self, message: str) -> None:
        t = self._halt("engine", message)
        self._fail_queue(t, "engine", message)
        self._heap.clear()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        heap = self._heap
        due = self._clock.now() + TIMER_SLACK_S
        while heap and heap[0][0] <= due:
            end, seq, w = heapq.heappop(heap)
            if seq == w.seq:
                self._end_step(w, end)
        self._arm()


def _input_tokens(request: Request) -> int:
    if request.input_tokens > 0:
        return request.input_tokens
    if request.input_ids:
        return len(request.input_ids)
    if request.prompt:
        return max(1, math.ceil(len(request.prompt) / CHARS_PER_TOKEN))
    return 1


async def run_engines_until(engines: Sequence[SimEngine], t_s: float) -> None:
    """Advance engines that share one ``VirtualClock`` to ``t_s``, in time order.

    Running them one after the other would move the shared clock past iterations another
    engine has not processed yet, so requests it admits would arrive "in the future".
    """
    if not engines:
        return
    clock = engines[0]._virtual_clock()
    if any(e._clock is not clock for e in engines):
        raise EngineError("run_engines_until needs engines on one shared VirtualClock")
    while True:
        await asyncio.sleep(0)  # let readers submit at the current time
        for engine in engines:
            if engine._kick_pending:
                engine._kick()
        first = min(engines, key=lambda e: e.next_event_s)
        if first.next_event_s > t_s:
            break
        end, _, w = heapq.heappop(first._heap)
        clock.set(max(end, clock.now()))
        first._end_step(w, end)
    if t_s > clock.now():
        clock.set(t_s)
