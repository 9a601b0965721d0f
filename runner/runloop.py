"""The loop that drives a started engine through the phases of a run (``run_scenario``).

It issues requests as the scenario says (``runner.scenarios``), keeps the in-flight set
(``runner.flight``), opens the measured window after the warm-up (``runner.warmup``), reads
energy and reports progress about once a second, and stops at the run's bound, on cancel or
after repeated errors; ``runner.outcome`` turns the phases into the result.

Time: on a wall clock the loop sleeps with asyncio. On a ``VirtualClock`` it drives the
simulated engine's virtual time itself (``VirtualTime``: ``run_until`` / ``step``), so a test
simulates minutes in milliseconds, deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import uuid

from opentelemetry.metrics import Meter

from rackscope.clock import Clock, VirtualClock
from rackscope.errors import ConfigError, RackscopeError
from rackscope.runner.config import RunConfig
from rackscope.runner.datasets import Dataset
from rackscope.runner.energy import EnergyMeter
from rackscope.runner.engines.base import (
    CountsLiveTokens,
    Engine,
    Failed,
    HasGpus,
    HintsInflight,
    RecordsWholeRequests,
    Request,
    SubmitsCallbacks,
    VirtualTime,
)
from rackscope.runner.flight import Flight
from rackscope.runner.outcome import build_result, engine_gpu_models
from rackscope.runner.progress import Progress, ProgressCallback
from rackscope.runner.records import CANCELLED, RequestRecord
from rackscope.runner.results.record import RunResult, now_utc
from rackscope.runner.results.window import Phase
from rackscope.runner.scenarios import (
    DEFAULT_OFFLINE_INFLIGHT,
    DEFAULT_OFFLINE_INFLIGHT_IN_PROCESS,
    PhaseSpec,
    make_dataset,
    phase_specs,
)
from rackscope.runner.telemetry import WorkloadTelemetry
from rackscope.runner.warmup import drains_first, ramp_over, warmup_deadline, warmup_mode

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 1.0  # energy readings and progress reports
# An unbounded run (until cancelled, as the agent's continuous demo) starts a fresh window
# when this many records have piled up, so memory stays bounded.
UNBOUNDED_RECORD_LIMIT = 200_000


class Runner:
    """Drives one engine through the phases of a run."""

    def __init__(
        self,
        engine: Engine,
        config: RunConfig,
        dataset: Dataset,
        *,
        virtual: VirtualClock | None,
        energy: EnergyMeter | None,
        telemetry: WorkloadTelemetry,
        progress: ProgressCallback | None,
        cancel: asyncio.Event | None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.dataset = dataset
        self.virtual = virtual
        self.energy = energy
        self.telemetry = telemetry
        self.progress = progress
        self.cancel = cancel
        # What the engine declares beyond streaming, asked once: the callback fast path
        # (simulated engine), the whole-request fast path (openai), virtual time.
        self.submit = engine.submit if isinstance(engine, SubmitsCallbacks) else None
        self.record_fn = engine.record if isinstance(engine, RecordsWholeRequests) else None
        self.clocked = engine if isinstance(engine, VirtualTime) else None
        # A whole-request call shows its tokens only when it ends. The exported token counter
        # must follow tokens as they stream, so whole-request calls are taken only when nobody
        # collects it (no meter handed in) or when the engine counts its open requests itself;
        # otherwise those requests are streamed, which costs more CPU per token.
        self.live_engine = engine if isinstance(engine, CountsLiveTokens) else None
        self.whole_requests = self.record_fn is not None and (
            self.live_engine is not None or not telemetry.exported
        )
        if virtual is not None and (self.submit is None or self.clocked is None):
            raise ConfigError(f"a virtual clock needs an engine that runs on virtual time, not {engine.name!r}")
        # Token gaps (ITL) are kept for engines that stream real arrivals; the simulated
        # engine's gaps are its iteration times, not worth a float per token of memory.
        self.keep_gaps = self.submit is None
        # Streaming engines report every token when a run may be cut at a deadline, so the
        # tokens they had by then count. Simulated requests report only first token and end
        # (a per-token callback would cost ~1M calls/s for a rack); a cut-short one is asked
        # for its count when stopped.
        self.stream_tokens = config.duration_s is not None and self.submit is None
        # Requests the engine counts live itself (submitted, or whole-request calls): one call
        # per collection instead of a pass over every request in flight (thousands per node).
        self.engine_counts = self.live_engine is not None and (
            self.submit is not None or (self.whole_requests and not self.stream_tokens)
        )
        self.tokens_received = 0  # output tokens seen from any request, warm-up included
        self.deadline: float | None = None
        self.inflight: set[Flight] = set()
        self.index = 0
        self.stop_reason: str | None = None
        self.consecutive_errors = 0
        self.wake = asyncio.Event()
        # per-phase state
        self.phase: Phase | None = None
        self.measuring = False
        self.issued_measured = 0
        self.issued_warmup = 0
        self.done_measured = 0
        self.failed_measured = 0
        self.tokens_measured = 0
        self.last_end_s: float | None = None

    # --- time ----------------------------------------------------------------------------
    def now(self) -> float:
        return self.engine.now()

    async def wait(self, until: float | None, reactive: bool) -> None:
        """Until something finishes or the clock reaches ``until``."""
        if self.virtual is not None:
            engine = self.clocked
            assert engine is not None  # checked in __init__
            now = self.now()
            if until is not None and (not reactive or not self.inflight):
                await engine.run_until(max(until, now))
                return
            if not await engine.step():
                if until is not None:
                    await engine.run_until(max(until, now))
                elif self.inflight:
                    # Nothing can move any more: no iteration pending, no timer, requests stuck.
                    self.stop_reason = self.stop_reason or "stalled"
            return
        timeout = None if until is None else max(0.0, until - self.now())
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.wake.wait()

    # --- issuing -------------------------------------------------------------------------
    def issue(self, start_s: float | None = None) -> None:
        measured = self.measuring
        i = self.index
        self.index += 1
        request = self.dataset.request(i, f"{self.config.run_id or 'run'}-{i}")
        if self.stream_tokens:
            request.extra["stream_tokens"] = True  # partial token counts for requests cut at the end
        now = self.now()
        t0 = now if start_s is None else min(start_s, now)
        rec = RequestRecord(request_id=request.request_id, start_s=t0, input_tokens=request.input_tokens)
        flight = Flight(self, rec, measured)
        if measured:
            self.issued_measured += 1
        else:
            self.issued_warmup += 1
        self.inflight.add(flight)
        if self.submit is not None:
            flight.opaque = True  # first token and end only
            job = self.submit(request, flight.on_event, stream_tokens=False)
            if not flight.done:
                flight.cancel_fn = job.cancel
                flight.job = job
        elif self.whole_requests and not self.stream_tokens:
            flight.opaque = True
            flight.task = asyncio.create_task(self._record_task(flight, request, scheduled=start_s is not None))
        else:
            flight.task = asyncio.create_task(self._stream_task(flight, request))

    async def _record_task(self, flight: Flight, request: Request, *, scheduled: bool) -> None:
        """``scheduled``: an open-loop arrival, whose latency counts from its scheduled time
        even when the client issued it late; a closed-loop request counts from when the engine
        wrote its bytes (its record's ``start_s``), not from when this loop queued it."""
        assert self.record_fn is not None
        try:
            rec: RequestRecord = await self.record_fn(request)
        except RackscopeError as exc:
            flight.on_event(Failed(self.now(), "engine", str(exc)))
            return
        except Exception as exc:  # task boundary: one broken request must not end the run
            log.exception("request %s crashed", request.request_id)
            flight.on_event(Failed(self.now(), "engine", f"{type(exc).__name__}: {exc}"))
            return
        if flight.done:
            return
        if scheduled:
            rec.start_s = min(flight.rec.start_s, rec.start_s)
        flight.rec = rec
        self.tokens_received += rec.output_tokens
        if rec.end_s is None:
            rec.end_s = self.now()
        self.finish(flight)

    async def _stream_task(self, flight: Flight, request: Request) -> None:
        try:
            async for ev in self.engine.stream(request):
                flight.on_event(ev)
                if flight.done:
                    return
            if not flight.done:
                flight.on_event(Failed(self.now(), "protocol", "the engine ended the stream without Done"))
        except RackscopeError as exc:
            flight.on_event(Failed(self.now(), "engine", str(exc)))
        except Exception as exc:  # task boundary: one broken request must not end the run
            log.exception("request %s crashed", request.request_id)
            flight.on_event(Failed(self.now(), "engine", f"{type(exc).__name__}: {exc}"))

    def finish(self, flight: Flight) -> None:
        """A request left the engine (finished, failed or stopped)."""
        flight.done = True
        self.inflight.discard(flight)
        rec = flight.rec
        self.telemetry.record(rec)
        if rec.ok:
            self.consecutive_errors = 0
        elif rec.error_type != CANCELLED:
            self.consecutive_errors += 1
        if flight.measured and self.phase is not None:
            self.phase.records.append(rec)
            if rec.ok:
                self.done_measured += 1
                self.tokens_measured += rec.output_tokens
                if rec.end_s is not None:
                    self.last_end_s = rec.end_s if self.last_end_s is None else max(self.last_end_s, rec.end_s)
            elif rec.error_type != CANCELLED:
                self.failed_measured += 1
        elif flight.carried and self.phase is not None:
            self.phase.carried.append((rec, flight.before))
        self.wake.set()

    # --- energy and progress ---------------------------------------------------------------
    def read_energy(self) -> dict[str, float] | None:
        if self.energy is None:
            return None
        return dict(self.energy.read())

    def sample(self, label: str, prev: tuple[float, int], record_energy: bool = True) -> tuple[float, int]:
        """Record energy (in the window) and report progress; returns (now, tokens received)."""
        now = self.now()
        phase = self.phase
        if record_energy and phase is not None and self.measuring and (reading := self.read_energy()) is not None:
            phase.energy_samples.append((now, reading))
        if self.progress is not None and phase is not None:
            elapsed = now - phase.start_s
            dt = now - prev[0]
            rate = (self.tokens_received - prev[1]) / dt if dt > 0 else 0.0
            self.progress(Progress(
                elapsed_s=max(0.0, elapsed) if self.measuring else 0.0,
                requests_done=self.done_measured,
                requests_failed=self.failed_measured,
                in_flight=len(self.inflight),
                output_tokens=self.tokens_measured,
                output_tokens_per_s=rate,
                phase=label if self.measuring else "warmup",
            ))
        return now, self.tokens_received

    def live_tokens(self) -> dict[int | None, int]:
        """Output tokens received so far by the requests in flight, per GPU (None: not known
        yet): the run's live source for ``rackscope.tokens``. Called by metrics collectors,
        possibly from another thread while this loop runs: it reads counts, changes nothing,
        and skips flights already finished (``finish`` marks them before recording them)."""
        if self.engine_counts:
            assert self.live_engine is not None
            return dict(self.live_engine.live_output_tokens())
        try:
            flights = tuple(self.inflight)  # one C-level copy: no Python code runs meanwhile
        except RuntimeError:  # the set changed under a copy from another thread: next time
            return {}
        counts: dict[int | None, int] = {}
        for flight in flights:
            if flight.done:
                continue
            rec = flight.rec
            job = flight.job
            if job is not None:
                tokens = max(int(job.tokens_so_far), rec.output_tokens)
                gpu = job.gpu
            else:
                tokens = rec.output_tokens
                gpu = rec.gpu
            if tokens > 0:
                counts[gpu] = counts.get(gpu, 0) + tokens
        return counts

    def tokens_generated(self) -> int:
        """Output tokens generated so far, warm-up included, counting what requests still in
        flight have generated. A submitted (simulated) request reports only its first token
        and its end, so ``tokens_received`` alone moves in bursts as whole requests finish: a
        cold offline start, whose first requests all finish late together, would look flat
        (first tokens only) while its output is still climbing."""
        pending = 0
        for flight in self.inflight:
            if flight.job is not None:
                pending += max(0, int(flight.job.tokens_so_far) - flight.rec.output_tokens)
        return self.tokens_received + pending

    # --- one phase -------------------------------------------------------------------------
    def _begin_measure(self, phase: Phase, now: float) -> None:
        self.measuring = True
        phase.start_s = now
        for flight in self.inflight:
            flight.carried = True
            # A whole-request engine call reports nothing until it ends: tokens are prorated.
            flight.before = (
                int(flight.job.tokens_so_far) if flight.job is not None
                else None if flight.opaque else flight.rec.output_tokens
            )
        phase.energy_start = self.read_energy()
        if self.config.duration_s is not None:
            self.deadline = now + self.config.duration_s

    def _stop_inflight(self, t: float, why: str) -> list[asyncio.Task[None]]:
        """Stop everything in flight; returns the request tasks to await for their cleanup."""
        tasks = []
        for flight in list(self.inflight):
            if flight.task is not None:
                tasks.append(flight.task)
            flight.stop(t, why)
        return tasks

    def _halted(self) -> bool:
        """Stop issuing at once (a request may fail inside ``issue``, before any wait)."""
        return self.consecutive_errors >= self.config.max_consecutive_errors

    def _stop_requested(self) -> str | None:
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if self.consecutive_errors >= self.config.max_consecutive_errors:
            return "errors"
        return self.stop_reason

    def _offline_inflight(self, counted: bool) -> int:
        """How many requests an offline run keeps in flight. A counted batch goes out at once
        (to an in-process engine; a server gets at most DEFAULT_OFFLINE_INFLIGHT connections);
        a duration-bounded run tops up to what the engine says saturates it."""
        default = DEFAULT_OFFLINE_INFLIGHT_IN_PROCESS if self.submit is not None else DEFAULT_OFFLINE_INFLIGHT
        hint = self.engine.max_inflight if isinstance(self.engine, HintsInflight) else None
        if counted or hint is None or hint < 1:
            return default
        return min(hint, default) if self.submit is None else hint

    async def run_phase(self, spec: PhaseSpec, seed: int) -> Phase:
        cfg = self.config
        now = self.now()
        phase = Phase(records=[], start_s=now, end_s=now, point=spec.point, target_rate_per_s=spec.rate)
        self.phase = phase
        self.measuring = False
        self.deadline = None
        self.issued_measured = self.issued_warmup = 0
        self.done_measured = self.failed_measured = self.tokens_measured = 0
        self.last_end_s = None
        warm = warmup_mode(cfg, spec)
        drain = drains_first(cfg, spec, warm)
        warm_until = warmup_deadline(cfg, warm, now)
        ramped = False
        if warm == "none":
            self._begin_measure(phase, now)
        # A requests bound with a finite dataset and nothing else: the dataset once.
        limit = cfg.requests
        if limit is None and cfg.duration_s is None and self.dataset.finite:
            limit = len(self.dataset)
        unbounded = limit is None and cfg.duration_s is None
        reactive = spec.kind != "server"
        inflight_cap = spec.concurrency or 0
        if spec.kind == "offline":
            inflight_cap = cfg.offline_inflight or self._offline_inflight(limit is not None)
        rng = random.Random(seed)
        next_arrival = now + rng.expovariate(spec.rate) if spec.kind == "server" and spec.rate else None
        next_sample = now + SAMPLE_INTERVAL_S
        prev = (now, self.tokens_received)
        history: list[tuple[float, int]] = [prev]  # (t, tokens received) at each sample
        stop: str | None = None

        def may_issue(now: float) -> bool:
            if self.measuring:
                return limit is None or self.issued_measured < limit
            if warm == "requests":
                return self.issued_warmup < cfg.warmup_requests
            if warm == "seconds":
                return now < warm_until
            return True  # auto: keep the engine loaded until the ramp is over

        while True:
            now = self.now()
            stop = self._stop_requested()
            if stop is not None:
                break
            if self.measuring and self.deadline is not None and now >= self.deadline:
                stop = "duration"
                break
            if not self.measuring:
                warm_over = (
                    (warm == "requests" and self.issued_warmup >= cfg.warmup_requests)
                    or (warm in ("seconds", "auto") and now >= warm_until)
                    or ramped
                )
                if warm_over and (not drain or not self.inflight):
                    self._begin_measure(phase, now)
            can_issue = may_issue(now)
            if spec.kind == "server":
                assert next_arrival is not None
                assert spec.rate is not None
                while can_issue and next_arrival <= now and not self._halted():
                    self.issue(start_s=next_arrival)
                    next_arrival += rng.expovariate(spec.rate)
                    can_issue = may_issue(now)
            else:
                while can_issue and len(self.inflight) < inflight_cap and not self._halted():
                    self.issue()
                    can_issue = may_issue(now)
            stop = self._stop_requested()
            if stop is not None:
                break
            if self.measuring and not can_issue and not self.inflight:
                stop = "requests"
                break
            if unbounded and self.measuring and len(phase.records) >= UNBOUNDED_RECORD_LIMIT:
                phase.records.clear()
                phase.carried.clear()
                phase.energy_samples.clear()
                self._begin_measure(phase, now)
            if now >= next_sample:
                prev = self.sample(spec.label, prev)
                if warm == "auto" and not self.measuring:
                    history.append((prev[0], self.tokens_generated()))
                    ramped = ramp_over(history)
                next_sample = max(next_sample + SAMPLE_INTERVAL_S, now + SAMPLE_INTERVAL_S / 10)
                if ramped:
                    continue
            until = next_sample
            if self.deadline is not None and self.measuring:
                until = min(until, self.deadline)
            if warm == "seconds" and not self.measuring:
                until = min(until, warm_until)
            if next_arrival is not None and can_issue:
                until = min(until, next_arrival)
            await self.wait(until, reactive and bool(self.inflight))

        now = self.now()
        if not self.measuring:  # stopped during warm-up: an empty window
            self._begin_measure(phase, now)
        end = now
        if stop == "duration" and self.deadline is not None:
            end = self.deadline
        elif stop == "requests" and self.last_end_s is not None:
            end = max(phase.start_s, self.last_end_s)
        why = {"duration": "stopped at the end of the run's duration", "cancelled": "run cancelled",
               "errors": "run aborted after repeated errors"}.get(stop or "", "run stopped")
        await self._settle(self._stop_inflight(end, why))
        phase.end_s = end
        phase.energy_end = self._energy_at(phase, end)
        phase.stop_reason = stop or "requests"
        phase.complete = stop in ("duration", "requests")
        self.sample(spec.label, prev, record_energy=False)
        self.deadline = None
        self.phase = None
        return phase

    @staticmethod
    async def _settle(tasks: list[asyncio.Task[None]]) -> None:
        """Let stopped request tasks run their cleanup (an HTTP engine closes the connection)."""
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)

    def _energy_at(self, phase: Phase, t: float) -> dict[str, float] | None:
        """Energy at ``t``; when the clock is already past it (the last virtual iteration
        overshoots the deadline), interpolated from the last reading before ``t``."""
        now_reading = self.read_energy()
        if now_reading is None:
            return None
        now = self.now()
        if now <= t:
            return now_reading
        before = [(ts, r) for ts, r in phase.energy_samples if ts <= t]
        if phase.energy_start is not None:
            before.insert(0, (phase.start_s, dict(phase.energy_start)))
        if not before:
            return now_reading
        t0, r0 = before[-1]
        frac = (t - t0) / (now - t0) if now > t0 else 1.0
        return {k: r0[k] + (v - r0[k]) * frac for k, v in now_reading.items() if k in r0}


async def run_scenario(
    engine: Engine,
    config: RunConfig,
    *,
    clock: Clock | None = None,
    energy: EnergyMeter | None = None,
    meter: Meter | None = None,
    progress: ProgressCallback | None = None,
    cancel: asyncio.Event | None = None,
    dataset: Dataset | None = None,
) -> RunResult:
    """Drive a started engine through the configured scenario and return what it measured.

    The caller starts and stops the engine. ``clock``: pass the ``VirtualClock`` the simulated
    engine runs on to let this loop move virtual time; leave it out for wall-clock engines.
    ``cancel`` (or cancelling the task running this) stops issuing, stops what is in flight
    and returns a partial result (``complete`` false).
    """
    config = config.validate()
    if config.workers > 1:
        raise ConfigError("workers > 1 runs through runner.workers (rackscope run --workers), not run_scenario")
    run_id = config.run_id or uuid.uuid4().hex[:12]
    if config.run_id is None:
        config = dataclasses.replace(config, run_id=run_id)
    dataset = dataset if dataset is not None else make_dataset(config)
    model = engine.model or config.model
    telemetry = WorkloadTelemetry(meter, rack=config.rack, node=config.node, model=model, engine=engine.name,
                                  api=config.api)
    runner = Runner(
        engine, config, dataset,
        virtual=clock if isinstance(clock, VirtualClock) else None,
        energy=energy, telemetry=telemetry, progress=progress, cancel=cancel,
    )
    started_at = now_utc()
    phases: list[Phase] = []
    telemetry.run_started(run_id, config.scenario)
    stop_live = telemetry.add_live_source(runner.live_tokens)
    cancelled_task = False
    watcher = None
    if cancel is not None and runner.virtual is None:
        watcher = asyncio.create_task(_wake_on(cancel, runner.wake))
    try:
        for i, spec in enumerate(phase_specs(config)):
            phase = await runner.run_phase(spec, seed=config.seed * 1_000_003 + i)
            phases.append(phase)
            if not phase.complete:
                break
    except asyncio.CancelledError:
        # Cancelling the task is the other way to stop a run: return what was measured.
        cancelled_task = True
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        if runner.phase is not None:
            partial = runner.phase
            end = runner.now()
            await runner._settle(runner._stop_inflight(end, "run cancelled"))
            partial.end_s = max(partial.start_s, end)
            partial.energy_end = runner.read_energy()
            partial.complete = False
            partial.stop_reason = "cancelled"
            phases.append(partial)
    finally:
        stop_live()  # what was in flight has been recorded by now
        telemetry.run_ended()
        if watcher is not None:
            watcher.cancel()
    if not phases:
        now = runner.now()
        phases.append(Phase([], now, now, complete=False, stop_reason="cancelled"))
    result = build_result(
        config, phases, engine=engine.name, model=model, dataset=dataset, started_at=started_at,
        gpu_models=engine_gpu_models(engine, config),
        gpus=config.gpus or (len(engine.gpus) if isinstance(engine, HasGpus) else None),
    )
    if cancelled_task:
        log.info("run %s cancelled; returning a partial result", run_id)
    return result



async def _wake_on(event: asyncio.Event, wake: asyncio.Event) -> None:
    await event.wait()
    wake.set()

