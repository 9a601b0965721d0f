"""The simulated inference engine: continuous batching of Llama2-70B on simulated GPUs.

The engine works at batch-step granularity, never per token. Each GPU runs one iteration at a
time (TensorRT-LLM's in-flight batching): every running request decodes one token and newly
admitted requests have their whole prompt prefilled, which yields their first token. An
iteration costs

    step_s = (overhead + decode_token_s * decode_batch + prefill_token_s * prefill_tokens)
             * engine_slowdown / gpu.speed()

where ``overhead`` is the time to stream the weights once from HBM and the per-token costs are
calibrated (see ``Deployment``) so that a GPU saturated with MLPerf's Llama2-70B OpenOrca shape
produces exactly the profile's published output tokens/s times ``gpu.speed()``.
``gpu.speed()`` (node variation, power cap, thermal throttle, NVLink health) is read at the
start of every iteration, so an injected fault acts on the next step.

Memory: weights at the precision each family runs in MLPerf (FP8 on Hopper, NVFP4 on
Blackwell) plus a KV cache sized like TensorRT-LLM's (90 % of what is left). Requests reserve
their whole KV footprint (prompt + max output tokens) when admitted, as TensorRT-LLM's
guaranteed-no-evict scheduler does; they wait in a FIFO queue, shared by the engine's GPUs,
while no GPU has room. The GPU model is told the KV actually written so far, so memory rises
with load.

Cost: one heap entry and O(1) work per iteration, O(1) per request. A request finishing after
``n`` tokens is filed in a bucket keyed by the iteration it finishes in, so no iteration walks
the batch. Only requests that ask for token streaming (``stream_tokens``) get a ``Tokens``
event per iteration; everyone else sees ``FirstToken`` and ``Done``.

Time: on a wall clock one timer per engine fires at the earliest iteration end. On a
``VirtualClock`` nothing runs by itself; ``run_until`` / ``step`` / ``run_until_idle`` move
the clock from one iteration end to the next, so tests simulate minutes in milliseconds;
``run_engines_until`` does the same for several engines sharing one clock (a simulated rack).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import random
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from rackscope.clock import Clock, VirtualClock
from rackscope.errors import EngineError, EngineUnavailable
from rackscope.runner.engines.base import Done, EngineEvent, Failed, FirstToken, Request, Tokens
from rackscope.simgpu import GIB, GpuProfile, SimGpu

log = logging.getLogger(__name__)

# --- Llama2-70B ------------------------------------------------------------------------------
LLAMA2_70B_PARAMS = 68_976_648_192  # Hugging Face checkpoint parameter count
LLAMA2_70B_EMBEDDING_PARAMS = 2 * 32_000 * 8_192  # embedding + lm_head, kept at 16 bit
LLAMA2_70B_LAYERS = 80
LLAMA2_70B_KV_HEADS = 8  # grouped-query attention
LLAMA2_70B_HEAD_DIM = 128
LLAMA2_70B_HIDDEN = 8_192
LLAMA2_MAX_SEQ_LEN = 4_096  # prompt + output tokens
KV_BYTES_PER_ELEMENT = 1  # FP8 KV cache, as the MLPerf submissions on both families use
# K and V, per layer, per KV head, per head dimension: 163,840 bytes (160 KiB) per token.
KV_BYTES_PER_TOKEN = 2 * LLAMA2_70B_LAYERS * LLAMA2_70B_KV_HEADS * LLAMA2_70B_HEAD_DIM * KV_BYTES_PER_ELEMENT

# Bytes per parameter of the quantised layers. NVFP4 stores 4-bit values plus one FP8 scale
# per block of 16, i.e. 4.5 bits.
BYTES_PER_PARAM = {"fp8": 1.0, "nvfp4": 4.5 / 8}
# Precision and HBM bandwidth (bytes/s, datasheets) per GPU family. FP8 weights: 69.5 GB;
# NVFP4: 39.6 GB (the 16-bit embedding and lm_head add 1.05 GB to either).
WEIGHT_PRECISION = {"h100": "fp8", "h200": "fp8", "b200": "nvfp4", "gb200": "nvfp4", "gb300": "nvfp4"}
HBM_BYTES_PER_S = {"h100": 3.35e12, "h200": 4.8e12, "b200": 8.0e12, "gb200": 8.0e12, "gb300": 8.0e12}

# MLPerf Inference Llama2-70B (OpenOrca, 24,576 samples): mean output about 294 tokens; inputs
# are capped at 1,024 tokens, and we take their mean as 684 (an estimate: prefill is under half
# of an iteration's cost, so an error here moves the time split, not the calibrated
# throughput). The calibration is exact for whatever shape ``deployment_for`` is given.
MLPERF_MEAN_INPUT_TOKENS = 684
MLPERF_MEAN_OUTPUT_TOKENS = 294

# --- serving runtime (TensorRT-LLM-like defaults) --------------------------------------------
MAX_BATCH_LIMIT = 2_048  # TensorRT-LLM's default max_batch_size
# The batch a deployment is tuned for (its max_batch): 80 % of what the KV cache holds at the
# calibration shape. Requests of varied length crowd the batch with long ones (a request stays
# in proportion to its output), which raises the mean KV reservation in flight by ~10 % over
# the dataset mean; the headroom keeps the batch, not the KV cache, the binding limit, so
# varied and fixed lengths of the same means give the same throughput.
KV_BATCH_HEADROOM = 0.8
DEFAULT_MAX_NUM_TOKENS = 8_192  # prompt tokens prefilled per iteration (max_num_tokens)
KV_CACHE_FRACTION = 0.9  # free_gpu_memory_fraction
RUNTIME_RESERVE_BYTES = 3 * GIB  # CUDA context, activations and workspaces, outside the KV pool
# A prompt token costs about half a decode token: prefill is one dense GEMM per layer, with
# no per-token KV-cache read.
PREFILL_TOKEN_COST = 0.5
# Fraction of the step the weight stream may take at the calibration batch; beyond it the
# overhead is clipped so the per-token cost stays positive.
MAX_OVERHEAD_SHARE = 0.9
# Even a batch of one keeps the SMs busy streaming weights; utilisation (which drives power)
# rises from here to 1 at the calibration batch.
UTILIZATION_FLOOR = 0.35
# Tensor-parallel all-reduce traffic per token processed: two all-reduces per layer of the
# hidden state in 16 bit, ring over a 4-GPU group (each GPU sends 2 * (4 - 1) / 4 of it):
# 80 * 2 * 8,192 * 2 B * 1.5 = 3.9 MB per token, the same received.
TP_GROUP = 4
NVLINK_BYTES_PER_TOKEN = LLAMA2_70B_LAYERS * 2 * LLAMA2_70B_HIDDEN * 2 * 2 * (TP_GROUP - 1) / TP_GROUP
CHARS_PER_TOKEN = 4  # prompt length estimate when only text is given
MAX_LAG_S = 0.5  # wall clock: how far a late timer may replay missed iterations
TIMER_SLACK_S = 1e-6  # wall clock: asyncio may fire a timer up to its clock resolution early
MIN_SPEED = 1e-3  # a GPU capped below its idle power still crawls


@dataclass(frozen=True, slots=True)
class Deployment:
    """Llama2-70B on one GPU: memory footprint and the cost of one iteration at speed 1."""

    gpu_key: str
    precision: str
    weights_bytes: int
    kv_capacity_tokens: int
    step_overhead_s: float
    decode_token_s: float
    prefill_token_s: float
    max_batch: int  # also the calibration batch
    target_tokens_per_s: float

    def step_s(self, decode_batch: int, prefill_tokens: int) -> float:
        return self.step_overhead_s + self.decode_token_s * decode_batch + self.prefill_token_s * prefill_tokens

    def utilization(self, decode_batch: int, prefill_tokens: int) -> float:
        work = (decode_batch + PREFILL_TOKEN_COST * prefill_tokens) / self.max_batch
        return UTILIZATION_FLOOR + (1.0 - UTILIZATION_FLOOR) * min(1.0, work)


def deployment_for(
    profile: GpuProfile,
    input_tokens: int = MLPERF_MEAN_INPUT_TOKENS,
    output_tokens: int = MLPERF_MEAN_OUTPUT_TOKENS,
) -> Deployment:
    """Size the KV cache from HBM and calibrate step costs against the published throughput.

    At saturation ``B = max_batch`` requests are in flight (``KV_BATCH_HEADROOM`` of what the
    KV cache holds at this shape). Every iteration then yields ``B`` output tokens; on average
    ``B / output`` of them come from prefills of ``input`` tokens and the rest from decodes.
    Solving ``B / mean_step_s = published tokens/s`` for the per-token cost gives an exact
    calibration for that shape.
    """
    key = profile.key
    if key not in WEIGHT_PRECISION:
        raise EngineUnavailable(f"no Llama2-70B deployment known for GPU {profile.name!r}")
    precision = WEIGHT_PRECISION[key]
    quantised = LLAMA2_70B_PARAMS - LLAMA2_70B_EMBEDDING_PARAMS
    weights = int(quantised * BYTES_PER_PARAM[precision] + LLAMA2_70B_EMBEDDING_PARAMS * 2)
    free = profile.hbm_bytes - weights - RUNTIME_RESERVE_BYTES
    kv_tokens = int(free * KV_CACHE_FRACTION) // KV_BYTES_PER_TOKEN
    if kv_tokens < LLAMA2_MAX_SEQ_LEN:
        raise EngineUnavailable(f"Llama2-70B ({precision}) leaves no room for a KV cache on {profile.name}")
    batch = max(1, min(MAX_BATCH_LIMIT, int(KV_BATCH_HEADROOM * kv_tokens / (input_tokens + output_tokens))))
    target = profile.llama2_70b_tokens_per_s
    step_s = batch / target
    overhead = min(weights / HBM_BYTES_PER_S[key], MAX_OVERHEAD_SHARE * step_s)
    decode_share = (output_tokens - 1) / output_tokens
    prefill_share = PREFILL_TOKEN_COST * input_tokens / output_tokens
    decode_token_s = (step_s - overhead) / (batch * (decode_share + prefill_share))
    return Deployment(
        gpu_key=key,
        precision=precision,
        weights_bytes=weights,
        kv_capacity_tokens=kv_tokens,
        step_overhead_s=overhead,
        decode_token_s=decode_token_s,
        prefill_token_s=PREFILL_TOKEN_COST * decode_token_s,
        max_batch=batch,
        target_tokens_per_s=target,
    )


class _State(Enum):
    QUEUED = "queued"
    PREFILL = "prefill"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


_FINAL = (_State.DONE, _State.FAILED, _State.CANCELLED)
EventSink = Callable[[EngineEvent], None]


class SimJob:
    """One submitted request. ``cancel()`` withdraws it without an event (the caller left)."""

    __slots__ = (
        "_engine", "aged", "arrival_s", "finish_step", "first_step", "input_tokens", "output_tokens",
        "request_id", "reserve_tokens", "sink", "state", "stream_tokens", "worker",
    )

    def __init__(
        self, engine: SimEngine, request_id: str, input_tokens: int, output_tokens: int,
        arrival_s: float, sink: EventSink, stream_tokens: bool,
    ) -> None:
        self._engine = engine
        self.request_id = request_id
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.reserve_tokens = input_tokens + output_tokens
        self.arrival_s = arrival_s
        self.sink = sink
        self.stream_tokens = stream_tokens
        self.state = _State.QUEUED
        self.worker: _Worker | None = None
        self.first_step = 0
        self.finish_step = 0
        self.aged = 0  # tokens a warm-started request had "already" generated before the run

    @property
    def finished(self) -> bool:
        return self.state in _FINAL

    @property
    def gpu(self) -> int | None:
        return None if self.worker is None else self.worker.gpu.index

    @property
    def tokens_so_far(self) -> int:
        """Output tokens generated by now (all of them once done), without streaming tokens."""
        if self.state is _State.DONE:
            return self.output_tokens
        return self.worker.generated(self) if self.worker is not None else 0

    def cancel(self) -> None:
        self._engine._abort(self, None)

    def emit(self, event: EngineEvent) -> None:
        # Boundary: a consumer's callback must not take the engine down with it.
        try:
            self.sink(event)
        except Exception:
            log.exception("event consumer of request %s failed", self.request_id)


@dataclass(frozen=True, slots=True)
class GpuStats:
    gpu: int
    running: int  # requests decoding
    prefilling: int  # requests in the current iteration's prefill
    kv_used_tokens: int
    kv_capacity_tokens: int
    kv_used_bytes: int
    output_tokens: int  # cumulative
    input_tokens: int  # cumulative prompt tokens prefilled
    requests_done: int
    requests_failed: int
    dropped: bool


@dataclass(frozen=True, slots=True)
class EngineStats:
    queued: int
    gpus: tuple[GpuStats, ...]

    @property
    def running(self) -> int:
        return sum(g.running + g.prefilling for g in self.gpus)

    @property
    def output_tokens(self) -> int:
        return sum(g.output_tokens for g in self.gpus)


class _Worker:
    """The iteration loop of one GPU."""

    __slots__ = (
        "buckets", "dead", "deploy", "gpu", "idle", "input_tokens", "kv_capacity",
        "kv_reserved", "kv_used", "max_batch", "output_tokens", "prefill", "prefill_tokens", "requests_done",
        "requests_failed", "running", "seq", "step_decode", "steps_done", "steps_started", "streaming",
        "warm_first",
    )

    def __init__(self, gpu: SimGpu, deploy: Deployment, max_batch: int | None) -> None:
        self.gpu = gpu
        self.deploy = deploy
        self.max_batch = deploy.max_batch if max_batch is None else max_batch
        self.kv_capacity = deploy.kv_capacity_tokens
        self.kv_reserved = 0  # tokens promised to admitted requests
        self.kv_used = 0  # tokens actually written
        self.running = 0
        self.prefill: list[SimJob] = []
        self.prefill_tokens = 0
        self.step_decode = 0
        self.steps_started = 0
        self.steps_done = 0
        self.buckets: dict[int, list[SimJob]] = {}  # finishing iteration -> requests
        self.streaming: set[SimJob] = set()
        self.idle = False  # listed in the engine's idle stack
        self.dead = False
        self.seq = -1  # heap entry of the iteration in progress
        self.output_tokens = 0
        self.input_tokens = 0
        self.requests_done = 0
        self.requests_failed = 0
        self.warm_first: list[SimJob] = []  # warm-started requests owed their FirstToken

    def in_flight(self) -> list[SimJob]:
        jobs = [j for j in self.prefill if j.state is _State.PREFILL]
        for bucket in self.buckets.values():
            jobs.extend(bucket)
        return jobs

    def generated(self, job: SimJob) -> int:
        return 1 + self.steps_done - job.first_step if job.state is _State.RUNNING else 0


class EventChannel:
    """A request's events waiting for one async reader; consecutive token counts merge.

    ``submit(request, channel.push)`` then ``await channel.drain()`` hands over every event
    due so far in one list, so a server can write all chunks that fell due together at once.
    """

    __slots__ = ("events", "waiter")

    def __init__(self) -> None:
        self.events: list[EngineEvent] = []
        self.waiter: asyncio.Future[None] | None = None

    def push(self, event: EngineEvent) -> None:
        events = self.events
        last = events[-1] if events else None
        if isinstance(event, Tokens) and isinstance(last, Tokens):
            events[-1] = Tokens(event.t, last.count + event.count)
        else:
            events.append(event)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> list[EngineEvent]:
        """Wait for at least one event and take all that are there."""
        if not self.events:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        events, self.events = self.events, []
        return events


class SimEngine:
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
        self._workers = [_Worker(gpu, deployments[gpu.profile.key], max_batch) for gpu in gpus]
        self._max_kv_tokens = max(w.kv_capacity for w in self._workers)
        self._slowdown = 1.0
        self.engine_slowdown = engine_slowdown
        self._queue: deque[SimJob] = deque()
        self._queued = 0
        self._idle: list[_Worker] = []
        self._dead: list[_Worker] = []
        self._heap: list[tuple[float, int, _Worker]] = []
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
            job.state = _State.FAILED
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

    def stats(self) -> EngineStats:
        gpus = tuple(
            GpuStats(
                gpu=w.gpu.index,
                running=w.running,
                prefilling=sum(1 for j in w.prefill if j.state is _State.PREFILL),
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

    # --- scheduling --------------------------------------------------------------------------
    def _kick(self) -> None:
        """Start an iteration on idle GPUs while requests wait."""
        self._kick_pending = False
        if self._stopped:
            return
        if self._dead:
            self._revive()
        now = self._clock.now()
        idle, self._idle = self._idle, []
        # Share a burst between the idle GPUs rather than hand it all to the first one.
        share = math.ceil(self._queued / len(idle)) if idle else 0
        for w in idle:
            w.idle = False
            if self._queued > 0:
                self._begin_step(w, now, share)  # lists itself idle again if it finds nothing to do
            else:
                w.idle = True
                self._idle.append(w)
        if self._queued and len(self._dead) == len(self._workers):
            self._fail_queue(now, "engine", "no GPU is available (all dropped)")
        self._arm()

    def _revive(self) -> None:
        for w in [w for w in self._dead if not w.gpu.faults.dropped]:
            self._dead.remove(w)
            w.dead = False
            w.idle = True
            self._idle.append(w)

    def _begin_step(self, w: _Worker, start_s: float, admit_limit: int | None = None) -> None:
        gpu = w.gpu
        if gpu.faults.dropped:
            self._drop_worker(w, start_s)
            return
        queue = self._queue
        if self.warm_start and w.steps_started == 0 and not w.running:
            self._warm_admit(w, start_s, admit_limit)
        prefill = w.prefill
        tokens = 0
        slots = w.max_batch - w.running
        if admit_limit is not None:
            slots = min(slots, admit_limit)
        budget = self.max_num_tokens
        while queue and slots > 0:
            job = queue[0]
            if job.state is not _State.QUEUED:  # withdrawn while waiting
                queue.popleft()
                continue
            if job.arrival_s > start_s:  # a replayed late iteration cannot hold later arrivals
                break
            if w.kv_reserved + job.reserve_tokens > w.kv_capacity:
                break
            if prefill and tokens + job.input_tokens > budget:
                break
            queue.popleft()
            self._queued -= 1
            job.state = _State.PREFILL
            job.worker = w
            prefill.append(job)
            tokens += job.input_tokens
            w.kv_reserved += job.reserve_tokens
            slots -= 1
        decode = w.running
        if not prefill and decode == 0:
            now = self._clock.now()
            if self._queued and start_s < now:
                # A replayed iteration found only later arrivals: start afresh at now.
                self._begin_step(w, now)
            else:
                self._go_idle(w)
            return
        deploy = w.deploy
        w.kv_used += tokens + decode
        w.prefill_tokens = tokens
        w.step_decode = decode
        w.steps_started += 1
        gpu.set_load(deploy.utilization(decode, tokens), kv_bytes=w.kv_used * KV_BYTES_PER_TOKEN)
        speed = max(gpu.speed(), MIN_SPEED) / self._slowdown
        step_s = deploy.step_s(decode, tokens) / speed
        link_bytes_per_s = (decode + tokens) * NVLINK_BYTES_PER_TOKEN / step_s
        gpu.set_load(gpu.utilization, nvlink_tx_bytes_per_s=link_bytes_per_s, nvlink_rx_bytes_per_s=link_bytes_per_s)
        self._seq += 1
        w.seq = self._seq
        heapq.heappush(self._heap, (start_s + step_s, self._seq, w))

    def _warm_admit(self, w: _Worker, start_s: float, admit_limit: int | None) -> None:
        """Admit a first batch already decoding, as a running engine would hold it: its prompts
        taken as prefilled, and each request's remaining output drawn from the steady state's
        residual-life distribution (a slot holds a request with probability proportional to
        its length, at a uniform point of it), clamped to what the request may still produce.
        FirstToken comes at the end of the first iteration; only tokens generated from then on
        are counted."""
        queue = self._queue
        slots = w.max_batch if admit_limit is None else min(w.max_batch, admit_limit)
        jobs: list[SimJob] = []
        reserved = w.kv_reserved
        while queue and len(jobs) < slots:
            job = queue[0]
            if job.state is not _State.QUEUED:
                queue.popleft()
                continue
            if job.arrival_s > start_s or reserved + job.reserve_tokens > w.kv_capacity:
                break
            queue.popleft()
            self._queued -= 1
            reserved += job.reserve_tokens
            jobs.append(job)
        if not jobs:
            return
        lengths = [j.output_tokens for j in jobs]
        biased = self._rng.choices(lengths, weights=lengths, k=len(jobs))
        residual = sorted(self._rng.randint(1, length) for length in biased)
        # Rank-match residuals to requests by length so the clamp rarely binds.
        for job, drawn in zip(sorted(jobs, key=lambda j: j.output_tokens), residual, strict=True):
            if job.output_tokens < 2:  # too short to be mid-generation: take the normal path
                job.state = _State.QUEUED
                queue.appendleft(job)
                self._queued += 1
                continue
            remaining = min(job.output_tokens, max(2, drawn))
            job.aged = job.output_tokens - remaining
            job.output_tokens = remaining
            job.worker = w
            job.state = _State.RUNNING
            job.first_step = 1  # generated() = steps_done: one token per iteration from now
            job.finish_step = remaining
            w.buckets.setdefault(remaining, []).append(job)
            w.kv_reserved += job.reserve_tokens
            w.kv_used += job.input_tokens + job.aged - 1  # _release counts this run's tokens from first_step
            w.running += 1
            if job.stream_tokens:
                w.streaming.add(job)
            w.warm_first.append(job)

    def _go_idle(self, w: _Worker) -> None:
        w.seq = -1
        w.gpu.set_load(0.0, kv_bytes=0, nvlink_tx_bytes_per_s=0.0, nvlink_rx_bytes_per_s=0.0)
        if not w.idle and not w.dead:
            w.idle = True
            self._idle.append(w)

    def _end_step(self, w: _Worker, end_s: float) -> None:
        w.steps_done += 1
        step = w.steps_done
        if w.gpu.faults.dropped:
            self._drop_worker(w, end_s)
            return
        w.output_tokens += w.step_decode
        w.input_tokens += w.prefill_tokens
        gpu_index = w.gpu.index
        if w.warm_first:
            first_warm = FirstToken(end_s, 1)
            warm, w.warm_first = w.warm_first, []
            for job in warm:
                if job.state is _State.RUNNING:
                    job.emit(first_warm)
        if w.streaming:
            tokens = Tokens(end_s, 1)
            for job in tuple(w.streaming):
                if job.state is _State.RUNNING:
                    job.emit(tokens)
        bucket = w.buckets.pop(step, None)
        if bucket is not None:
            for job in bucket:
                if job.state is not _State.RUNNING:  # cancelled by an earlier callback
                    continue
                self._release(w, job)
                w.requests_done += 1
                job.state = _State.DONE
                job.emit(Done(end_s, job.input_tokens, job.output_tokens, "engine", gpu_index))
        if w.prefill:
            first = FirstToken(end_s, 1)
            prefill, w.prefill = w.prefill, []
            for job in prefill:
                if job.state is not _State.PREFILL:
                    continue
                w.output_tokens += 1
                job.first_step = step
                if job.output_tokens == 1:
                    w.kv_reserved -= job.reserve_tokens
                    w.kv_used -= job.input_tokens
                    w.requests_done += 1
                    job.state = _State.DONE
                    job.emit(first)
                    job.emit(Done(end_s, job.input_tokens, 1, "engine", gpu_index))
                    continue
                job.state = _State.RUNNING
                job.finish_step = finish = step + job.output_tokens - 1
                later = w.buckets.get(finish)
                if later is None:
                    w.buckets[finish] = [job]
                else:
                    later.append(job)
                w.running += 1
                if job.stream_tokens:
                    w.streaming.add(job)
                job.emit(first)
        start_s = end_s
        if not self._virtual:
            start_s = max(end_s, self._clock.now() - MAX_LAG_S)
        self._begin_step(w, start_s)

    def _release(self, w: _Worker, job: SimJob) -> None:
        """Free a running request's batch slot and KV (reserved and written)."""
        w.running -= 1
        w.kv_reserved -= job.reserve_tokens
        w.kv_used -= job.input_tokens + job.aged + (w.steps_started - job.first_step)
        if job.stream_tokens:
            w.streaming.discard(job)

    def _abort(self, job: SimJob, event: Failed | None) -> None:
        """Withdraw a request wherever it is; ``event`` (if any) tells its consumer."""
        state = job.state
        w = job.worker
        if state is _State.QUEUED:
            self._queued -= 1  # the queue drops it lazily
        elif state is _State.PREFILL:
            assert w is not None
            w.kv_reserved -= job.reserve_tokens
            w.kv_used -= job.input_tokens
        elif state is _State.RUNNING:
            assert w is not None
            bucket = w.buckets.get(job.finish_step)
            if bucket is not None:
                bucket.remove(job)
                if not bucket:
                    del w.buckets[job.finish_step]
            self._release(w, job)
        else:
            return
        if event is None:
            job.state = _State.CANCELLED
        else:
            job.state = _State.FAILED
            if w is not None:
                w.requests_failed += 1
            job.emit(event)

    def _drop_worker(self, w: _Worker, t: float) -> None:
        message = f"GPU {w.gpu.index} fell off the bus (XID 79)"
        jobs = w.in_flight()
        if jobs:
            log.warning("%s: failing %d requests", message, len(jobs))
        for job in jobs:
            self._abort(job, Failed(t, "engine", message, w.generated(job)))
        self._reset_worker(w)
        if not w.dead:
            w.dead = True
            self._dead.append(w)
        if w.idle:
            w.idle = False
            self._idle.remove(w)
        if self._queued and len(self._dead) == len(self._workers):
            self._fail_queue(t, "engine", "no GPU is available (all dropped)")

    def _reset_worker(self, w: _Worker) -> None:
        w.prefill = []
        w.buckets.clear()
        w.streaming.clear()
        w.running = w.kv_reserved = w.kv_used = 0
        w.seq = -1
        w.gpu.set_load(0.0, kv_bytes=0, nvlink_tx_bytes_per_s=0.0, nvlink_rx_bytes_per_s=0.0)

    def _fail_queue(self, t: float, error_type: str, message: str) -> None:
        queue, self._queue = self._queue, deque()
        self._queued = 0
        for job in queue:
            if job.state is _State.QUEUED:
                job.state = _State.FAILED
                job.emit(Failed(t, error_type, message))

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
