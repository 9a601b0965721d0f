"""The batch scheduler: the shared request queue and each GPU's iteration loop (admit, step, finish)."""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import deque

from rackscope.clock import Clock
from rackscope.runner.engines.base import Done, Failed, FirstToken, Tokens
from rackscope.runner.engines.sim.deployment import KV_BYTES_PER_TOKEN, NVLINK_BYTES_PER_TOKEN, Deployment
from rackscope.runner.engines.sim.jobs import JobState, SimJob
from rackscope.simgpu import SimGpu

log = logging.getLogger(__package__)  # the package's name, like every module of the engine

# Wall clock: how far a late timer may replay missed iterations. A host that stalls the process
# for a moment (a busy machine, a collection pause) must not cost the simulated GPUs their
# tokens: their power model keeps drawing through the stall, so lost iterations would read as
# lost tokens per joule and a healthy node would look inefficient. Longer gaps (a laptop that
# slept) are dropped rather than replayed in one burst.
MAX_LAG_S = 2.0
MIN_SPEED = 1e-3  # a GPU capped below its idle power still crawls


class GpuWorker:
    """The iteration loop of one GPU."""

    __slots__ = (
        "buckets", "dead", "deploy", "first_steps", "gpu", "idle", "input_tokens", "kv_capacity",
        "kv_reserved", "kv_used", "live", "max_batch", "output_tokens", "prefill", "prefill_tokens", "requests_done",
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
        # Tokens generated so far by the requests decoding here, for live telemetry: running
        # requests have made 1 + steps_done - first_step tokens each, so the sum needs only
        # their count and the sum of their first steps. ``live`` is that sum, stored whole
        # after every change so a reader on another thread never sees a half-made update.
        self.first_steps = 0
        self.live = 0
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
        jobs = [j for j in self.prefill if j.state is JobState.PREFILL]
        for bucket in self.buckets.values():
            jobs.extend(bucket)
        return jobs

    def generated(self, job: SimJob) -> int:
        return 1 + self.steps_done - job.first_step if job.state is JobState.RUNNING else 0

    def update_live(self) -> None:
        self.live = self.running * (1 + self.steps_done) - self.first_steps


class BatchScheduler:
    """Admission, iteration cost, completion and failure for every GPU of one engine.

    ``SimEngine`` sets up the state declared here in its ``__init__`` and drives time: a
    wall-clock timer or a ``VirtualClock`` pops ``_heap`` (iteration ends) and calls
    ``_end_step``. Keeping the fields on the engine, not on a separate object, leaves the hot
    path one attribute lookup deep.
    """

    _clock: Clock
    _virtual: bool  # runs on a VirtualClock
    _stopped: bool
    _slowdown: float
    _workers: list[GpuWorker]
    _queue: deque[SimJob]  # FIFO shared by the GPUs; withdrawn requests are dropped lazily
    _queued: int  # requests in _queue still waiting
    _idle: list[GpuWorker]
    _dead: list[GpuWorker]
    _heap: list[tuple[float, int, GpuWorker]]  # (end, seq, worker); stale when seq != worker.seq
    _seq: int
    _kick_pending: bool
    _rng: random.Random
    max_num_tokens: int
    warm_start: bool

    def _arm(self) -> None:
        """Hook for the engine: keep one timer set for the earliest iteration end (wall clock only)."""

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

    def _begin_step(self, w: GpuWorker, start_s: float, admit_limit: int | None = None) -> None:
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
            if job.state is not JobState.QUEUED:  # withdrawn while waiting
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
            job.state = JobState.PREFILL
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

    def _warm_admit(self, w: GpuWorker, start_s: float, admit_limit: int | None) -> None:
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
            if job.state is not JobState.QUEUED:
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
                job.state = JobState.QUEUED
                queue.appendleft(job)
                self._queued += 1
                continue
            remaining = min(job.output_tokens, max(2, drawn))
            job.aged = job.output_tokens - remaining
            job.output_tokens = remaining
            job.worker = w
            job.state = JobState.RUNNING
            job.first_step = 1  # generated() = steps_done: one token per iteration from now
            job.finish_step = remaining
            w.buckets.setdefault(remaining, []).append(job)
            w.kv_reserved += job.reserve_tokens
            w.kv_used += job.input_tokens + job.aged - 1  # _release counts this run's tokens from first_step
            w.running += 1
            w.first_steps += 1
            if job.stream_tokens:
                w.streaming.add(job)
            w.warm_first.append(job)
        w.update_live()

    def _go_idle(self, w: GpuWorker) -> None:
        w.seq = -1
        w.gpu.set_load(0.0, kv_bytes=0, nvlink_tx_bytes_per_s=0.0, nvlink_rx_bytes_per_s=0.0)
        if not w.idle and not w.dead:
            w.idle = True
            self._idle.append(w)

    def _end_step(self, w: GpuWorker, end_s: float) -> None:
        w.steps_done += 1
        step = w.steps_done
        w.update_live()  # every running request made one more token
        if w.gpu.faults.dropped:
            self._drop_worker(w, end_s)
            return
        w.output_tokens += w.step_decode
        w.input_tokens += w.prefill_tokens
        gpu_index = w.gpu.index
        if w.warm_first:
            first_warm = FirstToken(end_s, 1, gpu_index)
            warm, w.warm_first = w.warm_first, []
            for job in warm:
                if job.state is JobState.RUNNING:
                    job.emit(first_warm)
        if w.streaming:
            tokens = Tokens(end_s, 1)
            for job in tuple(w.streaming):
                if job.state is JobState.RUNNING:
                    job.emit(tokens)
        bucket = w.buckets.pop(step, None)
        if bucket is not None:
            for job in bucket:
                if job.state is not JobState.RUNNING:  # cancelled by an earlier callback
                    continue
                self._release(w, job)
                w.requests_done += 1
                job.state = JobState.DONE
                job.emit(Done(end_s, job.input_tokens, job.output_tokens, "engine", gpu_index))
        if w.prefill:
            first = FirstToken(end_s, 1, gpu_index)
            prefill, w.prefill = w.prefill, []
            for job in prefill:
                if job.state is not JobState.PREFILL:
                    continue
                w.output_tokens += 1
                job.first_step = step
                if job.output_tokens == 1:
                    w.kv_reserved -= job.reserve_tokens
                    w.kv_used -= job.input_tokens
                    w.requests_done += 1
                    job.state = JobState.DONE
                    job.emit(first)
                    job.emit(Done(end_s, job.input_tokens, 1, "engine", gpu_index))
                    continue
                job.state = JobState.RUNNING
                job.finish_step = finish = step + job.output_tokens - 1
                later = w.buckets.get(finish)
                if later is None:
                    w.buckets[finish] = [job]
                else:
                    later.append(job)
                w.running += 1
                w.first_steps += step
                w.update_live()
                if job.stream_tokens:
                    w.streaming.add(job)
                job.emit(first)
        start_s = end_s
        if not self._virtual:
            start_s = max(end_s, self._clock.now() - MAX_LAG_S)
        self._begin_step(w, start_s)

    def _release(self, w: GpuWorker, job: SimJob) -> None:
        """Free a running request's batch slot and KV (reserved and written). Its tokens leave
        the live count here, before its end event reaches the consumer who records them."""
        w.running -= 1
        w.first_steps -= job.first_step
        w.update_live()
        w.kv_reserved -= job.reserve_tokens
        w.kv_used -= job.input_tokens + job.aged + (w.steps_started - job.first_step)
        if job.stream_tokens:
            w.streaming.discard(job)

    def _abort(self, job: SimJob, event: Failed | None) -> None:
        """Withdraw a request wherever it is; ``event`` (if any) tells its consumer."""
        state = job.state
        w = job.worker
        if state is JobState.QUEUED:
            self._queued -= 1  # the queue drops it lazily
        elif state is JobState.PREFILL:
            assert w is not None
            w.kv_reserved -= job.reserve_tokens
            w.kv_used -= job.input_tokens
        elif state is JobState.RUNNING:
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
            job.state = JobState.CANCELLED
        else:
            job.state = JobState.FAILED
            if w is not None:
                w.requests_failed += 1
            job.emit(event)

    def _drop_worker(self, w: GpuWorker, t: float) -> None:
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

    def _reset_worker(self, w: GpuWorker) -> None:
        w.prefill = []
        w.buckets.clear()
        w.streaming.clear()
        w.running = w.kv_reserved = w.kv_used = w.first_steps = w.live = 0
        w.seq = -1
        w.gpu.set_load(0.0, kv_bytes=0, nvlink_tx_bytes_per_s=0.0, nvlink_rx_bytes_per_s=0.0)

    def _fail_queue(self, t: float, error_type: str, message: str) -> None:
        queue, self._queue = self._queue, deque()
        self._queued = 0
        for job in queue:
            if job.state is JobState.QUEUED:
                job.state = JobState.FAILED
                job.emit(Failed(t, error_type, message))
