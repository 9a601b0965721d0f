"""A scenario over several client processes (``rackscope run --workers``).

For loads one process cannot stream: each phase is a fixed list of requests shared out by
``runner.workers``. The parent's telemetry follows the run as it goes, not at the end of each
phase: finished records are recorded as the workers send them (every
``runner.workers.FLUSH_INTERVAL_S``), and the output tokens of requests still in flight reach
``rackscope.tokens`` through a live source that reads the workers' shared-memory counters, so the
exported counter is at most a fraction of a second behind the tokens received. A ``progress``
callback gets the same figures about once a second."""

from __future__ import annotations

import dataclasses
import random
import threading
import uuid
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from opentelemetry.metrics import Meter

from rackscope.errors import ConfigError
from rackscope.runner.config import RunConfig
from rackscope.runner.datasets import Dataset
from rackscope.runner.engines.registry import worker_engine
from rackscope.runner.outcome import build_result
from rackscope.runner.progress import Progress, ProgressCallback
from rackscope.runner.records import CANCELLED, RequestRecord
from rackscope.runner.results.record import RunResult, now_utc
from rackscope.runner.results.window import Phase
from rackscope.runner.scenarios import DEFAULT_OFFLINE_INFLIGHT, PhaseSpec, make_dataset, phase_specs
from rackscope.runner.telemetry import WorkloadTelemetry

if TYPE_CHECKING:
    from rackscope.runner.workers import WorkerProgress


def run_with_workers(
    config: RunConfig,
    *,
    stop: threading.Event | None = None,
    dataset: Dataset | None = None,
    meter: Meter | None = None,
    progress: ProgressCallback | None = None,
) -> RunResult:
    """Run the scenario over ``config.workers`` client processes (``runner.workers``), for
    loads one process cannot stream. Blocking: call it in a thread from async code.

    Each phase is a fixed list of requests (``requests``, after ``warmup_requests``), so a
    requests bound is required; ``duration_s`` caps each phase (requests still in flight at
    that moment are stopped without their partial tokens, and the window ends there).
    Energy is not read on this path. ``progress`` gets a ``Progress`` about once a second
    (its counts cover the whole phase, warm-up requests included).
    """
    from rackscope.runner.workers import LiveTokens, run_workers

    config = config.validate()
    if config.engine != "openai":
        raise ConfigError("several workers need the openai engine")
    if config.requests is None and not config.dataset:
        raise ConfigError("several workers need a requests bound (--requests)")
    if config.warmup_s:
        raise ConfigError("with several workers give the warm-up in requests, not seconds")
    if config.run_id is None:
        config = dataclasses.replace(config, run_id=uuid.uuid4().hex[:12])
    assert config.url is not None
    dataset = dataset if dataset is not None else make_dataset(config)
    # Built in each worker process from the settings, by the same registration as everywhere.
    factory = partial(worker_engine, config)
    telemetry = WorkloadTelemetry(meter, rack=config.rack, node=config.node, model=config.model,
                                  engine=config.engine, api=config.api)
    stop = stop if stop is not None else threading.Event()
    started_at = now_utc()
    phases: list[Phase] = []
    index = 0
    telemetry.run_started(config.run_id or "", config.scenario)
    live = LiveTokens()
    stop_live = telemetry.add_live_source(lambda: {None: live.output_tokens()})

    def record_all(records: list[RequestRecord]) -> None:
        for rec in records:
            telemetry.record(rec)

    try:
        for i, spec in enumerate(phase_specs(config)):
            n_measured = config.requests or len(dataset)
            n_warm = config.warmup_requests
            requests = [dataset.request(index + k, f"{config.run_id}-{index + k}") for k in range(n_warm + n_measured)]
            index += len(requests)
            arrivals = None
            if spec.kind == "server":
                assert spec.rate is not None
                rng = random.Random(config.seed * 1_000_003 + i)
                t, arrivals = 0.0, []
                for _ in requests:
                    t += rng.expovariate(spec.rate)
                    arrivals.append(t)
            concurrency = spec.concurrency if spec.kind == "concurrency" else None
            if spec.kind == "offline":
                concurrency = config.offline_inflight or DEFAULT_OFFLINE_INFLIGHT
            timed_out = threading.Event()
            timer = None
            if config.duration_s is not None:
                def expire(flag: threading.Event = timed_out) -> None:
                    flag.set()
                    stop.set()

                timer = threading.Timer(config.duration_s, expire)
                timer.daemon = True
                timer.start()
            on_progress = _progress_reporter(progress, spec.label) if progress is not None else None
            try:
                run = run_workers(
                    requests, factory, config.workers, concurrency=concurrency, arrivals_s=arrivals, stop=stop,
                    live=live, on_records=record_all, on_progress=on_progress,
                )
            finally:
                if timer is not None:
                    timer.cancel()
            warm_ids = {r.request_id for r in requests[:n_warm]}
            phase = phase_from_records(run.records, warm_ids, run.start_s, run.end_s, spec)
            if timed_out.is_set():
                stop.clear()
                phase.stop_reason, phase.complete = "duration", True
                phase.end_s = min(phase.end_s, phase.start_s + config.duration_s) if config.duration_s else phase.end_s
            elif run.interrupted:
                phase.stop_reason, phase.complete = "cancelled", False
            elif trailing_errors(phase.records) >= config.max_consecutive_errors:
                phase.stop_reason, phase.complete = "errors", False
            phases.append(phase)
            if not phase.complete:
                break
    finally:
        stop_live()
        telemetry.run_ended()
    return build_result(
        config, phases, engine=config.engine, model=config.model, dataset=dataset, started_at=started_at,
        gpu_models=[config.gpu_model] if config.gpu_model else [], gpus=config.gpus,
    )


def _progress_reporter(progress: ProgressCallback, label: str) -> Callable[[WorkerProgress], None]:
    """Turns ``run_workers``' progress into ``Progress`` (the rate over the last report)."""
    last = [0.0, 0]

    def report(p: WorkerProgress) -> None:
        dt = p.elapsed_s - last[0]
        rate = (p.output_tokens - last[1]) / dt if dt > 0 else 0.0
        last[:] = [p.elapsed_s, p.output_tokens]
        progress(Progress(
            elapsed_s=p.elapsed_s, requests_done=p.requests_done, requests_failed=p.requests_failed,
            in_flight=p.in_flight, output_tokens=p.output_tokens, output_tokens_per_s=rate, phase=label,
        ))

    return report


def phase_from_records(
    records: list[RequestRecord], warm_ids: set[str], start_s: float, end_s: float, spec: PhaseSpec
) -> Phase:
    """The measured window of a worker run: from the first measured request's start to the
    last one's end; warm-up requests still running inside it count their tokens there."""
    warm = [r for r in records if r.request_id in warm_ids]
    measured = [r for r in records if r.request_id not in warm_ids]
    w_start = min((r.start_s for r in measured), default=start_s)
    w_end = max((r.end_s for r in measured if r.end_s is not None), default=end_s)
    carried: list[tuple[RequestRecord, int | None]] = [
        (r, None) for r in warm if r.end_s is not None and r.end_s > w_start
    ]
    for r in measured:
        if r.error_type is None and not r.ok:
            r.error_type, r.error = "protocol", "no outcome reported"
    return Phase(measured, w_start, max(w_start, w_end), point=spec.point, target_rate_per_s=spec.rate,
                 carried=carried)


def trailing_errors(records: list[RequestRecord]) -> int:
    """Failed requests at the end of the run, one after the other (stopped ones end the count)."""
    n = 0
    for r in sorted(records, key=lambda r: r.end_s or 0.0, reverse=True):
        if r.ok or r.error_type == CANCELLED:
            break
        n += 1
    return n

