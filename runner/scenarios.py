"""Benchmark scenarios (offline, server, concurrency, sweep), their configuration, and the
loop that drives an engine through one.

- ``offline``: every request issued at once, as MLPerf Offline's single query (a server
  gets at most ``offline_inflight``, default 1,024, connections at a time; the rest follow as
  others finish). Bounded by a duration only, the engine is kept saturated instead: its
  ``max_inflight`` hint (or 16,384) requests in flight, topped up as they finish.
- ``server``: Poisson arrivals at a target rate (seeded), open loop: an arrival never waits
  for an earlier request. TTFT/TPOT limits (MLPerf defaults, or the ``interactive`` preset)
  give goodput and a VALID/INVALID verdict on p99 TTFT and p99 TPOT.
- ``concurrency``: N requests in flight; a new one is issued as soon as one finishes.
- ``sweep``: one of the above per point of a list of concurrencies or rates.

A run stops at ``requests`` measured requests or ``duration_s`` seconds, whichever comes
first. At a duration's end the requests still in flight are stopped; the tokens they
received inside the window count towards throughput (that is what the engine produced),
but they count as neither completed nor failed (``requests_cancelled``). Warm-up requests
(or seconds) run first and are excluded from every result; for a requests-bounded
``offline`` run the warm-up batch drains before the measured batch is issued (one query, as
MLPerf); elsewhere, duration-bounded offline included, the measured window starts while the
warm-up requests are still in flight so the load never dips.

Time: on a wall clock the loop sleeps with asyncio. On a ``VirtualClock`` it drives the
simulated engine's virtual time itself (``run_until`` / ``step``), so a test simulates
minutes in milliseconds, deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import random
import socket
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from opentelemetry.metrics import Meter

from rackscope.clock import Clock, VirtualClock
from rackscope.errors import ConfigError, RackscopeError
from rackscope.runner.datasets import DISTRIBUTIONS, FILE_FORMATS, Dataset, SyntheticDataset, load_dataset
from rackscope.runner.engines.base import Done, Engine, EngineEvent, Failed, FirstToken, Request, Tokens
from rackscope.runner.progress import Progress, ProgressCallback
from rackscope.runner.records import RequestRecord
from rackscope.runner.results import CANCELLED, Limits, Phase, RunResult, environment, now_utc
from rackscope.runner.telemetry import WorkloadTelemetry
from rackscope.simgpu import SimGpu

log = logging.getLogger(__name__)

SCENARIOS = ("offline", "server", "concurrency", "sweep")
SWEEP_OVER = ("concurrency", "rate")
ENGINES = ("sim", "openai", "trtllm", "trtllm-bench", "hf")
APIS = ("completions", "chat")
# MLPerf Inference Llama2-70B latency limits (p99), seconds.
PRESETS: dict[str, Limits] = {
    "server": Limits(ttft_s=2.0, tpot_s=0.2),
    "interactive": Limits(ttft_s=0.45, tpot_s=0.04),
}
# MLPerf's Llama2-70B dataset shape (OpenOrca): the simulated engine is calibrated on it.
DEFAULT_INPUT_LEN = 684
DEFAULT_OUTPUT_LEN = 294
# Requests an offline run keeps in flight when the engine gives no ``max_inflight`` hint: for a
# server, more than a node batches at once (so its queue never runs dry) yet within a
# process's usual limit of open connections; for an in-process engine (queuing costs nothing)
# more than eight GPUs at TensorRT-LLM's largest batch.
DEFAULT_OFFLINE_INFLIGHT = 1024
DEFAULT_OFFLINE_INFLIGHT_IN_PROCESS = 16_384
SAMPLE_INTERVAL_S = 1.0  # energy readings and progress reports
# Automatic warm-up: the window opens when the output rate over the last AUTO_WARMUP_SPAN_S
# grew less than AUTO_WARMUP_GROWTH over the span before it (spans of several seconds, so an
# engine that delivers tokens in bursts of whole iterations does not look flat by chance), or
# after AUTO_WARMUP_MAX_S at the latest.
AUTO_WARMUP_GROWTH = 0.02
AUTO_WARMUP_SPAN_S = 3.0
AUTO_WARMUP_MAX_S = 120.0
DEFAULT_MAX_CONSECUTIVE_ERRORS = 20
# An unbounded run (until cancelled, as the agent's continuous demo) starts a fresh window
# when this many records have piled up, so memory stays bounded.
UNBOUNDED_RECORD_LIMIT = 200_000


@runtime_checkable
class EnergyMeter(Protocol):
    """Cumulative energy per GPU. ``read`` returns joules keyed ``"<node>/<gpu index>"``; it is
    called at a window's start and end and about once a second in between."""

    def read(self) -> dict[str, float]: ...


class SimEnergyMeter:
    """An ``EnergyMeter`` over simulated GPUs (integrated exactly up to the clock's now)."""

    def __init__(self, gpus: list[SimGpu], node: str) -> None:
        self.gpus = gpus
        self.node = node

    def read(self) -> dict[str, float]:
        out = {}
        for gpu in self.gpus:
            gpu.advance()
            out[f"{self.node}/{gpu.index}"] = gpu.energy_j
        return out


def _default_node() -> str:
    return socket.gethostname().split(".")[0] or "node"


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, as the CLI flags and the agent's ``POST /v1/runs`` body give it.

    ``from_dict`` validates; every key is a field name below. ``api_key`` is never written
    out by ``to_dict``.
    """

    engine: str = "sim"
    model: str = "llama2-70b"
    scenario: str = "offline"
    requests: int | None = None
    duration_s: float | None = None
    warmup_requests: int = 0
    warmup_s: float = 0.0
    # Duration-bounded offline runs without an explicit warm-up measure from the end of the
    # ramp-up (when the output rate stops climbing), as a steady-state figure should.
    warmup_auto: bool = True
    concurrency: int | None = None
    rate: float | None = None  # requests per second (server)
    sweep: tuple[float, ...] = ()
    sweep_over: str = "concurrency"
    preset: str | None = None
    ttft_limit_s: float | None = None
    tpot_limit_s: float | None = None
    offline_inflight: int | None = None
    input_len: int = DEFAULT_INPUT_LEN
    output_len: int = DEFAULT_OUTPUT_LEN
    length_dist: str = "fixed"
    length_spread: float = 0.25
    dataset: str | None = None
    dataset_format: str = "jsonl"
    seed: int = 0
    rack: str = "r1"
    node: str = field(default_factory=_default_node)
    gpus: int | None = None
    gpu_model: str | None = None
    workers: int = 1
    url: str | None = None
    api: str = "completions"
    api_key: str | None = field(default=None, repr=False)
    request_timeout_s: float = 600.0
    max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS
    run_id: str | None = None
    # Simulated engine only: start in steady state (first batch part-way through generation)
    # instead of filling every batch from cold; see runner.engines.sim.SimEngine.
    sim_warm_start: bool = False

    # --- construction ------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build and validate; ``ConfigError`` names the offending key. ``None`` means default."""
        if not isinstance(data, Mapping):
            raise ConfigError("a run configuration must be a JSON object")
        names = cls.field_names()
        data = {k: v for k, v in data.items() if k != "api_key_set"}  # what to_dict says instead of the key
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            raise ConfigError(f"unknown run setting(s): {', '.join(unknown)}; known: {', '.join(names)}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in data and data[f.name] is not None:
                kwargs[f.name] = _coerce(f.name, data[f.name], _FIELD_TYPES[f.name])
        return cls(**kwargs).validate()

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sweep"] = list(self.sweep)
        out.pop("api_key")
        out["api_key_set"] = self.api_key is not None
        return out

    # --- checks ------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.engine in ENGINES, f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        need(self.scenario in SCENARIOS, f"scenario must be one of {', '.join(SCENARIOS)}, not {self.scenario!r}")
        need(self.requests is None or self.requests >= 1, "requests must be at least 1")
        need(self.duration_s is None or self.duration_s > 0, "duration_s must be positive")
        need(self.warmup_requests >= 0 and self.warmup_s >= 0, "warm-up must not be negative")
        need(not (self.warmup_requests and self.warmup_s), "give the warm-up in requests or in seconds, not both")
        need(self.concurrency is None or self.concurrency >= 1, "concurrency must be at least 1")
        need(self.rate is None or (self.rate > 0 and math.isfinite(self.rate)), "rate must be a positive number")
        need(self.offline_inflight is None or self.offline_inflight >= 1, "offline_inflight must be at least 1")
        need(self.sweep_over in SWEEP_OVER, f"sweep_over must be one of {', '.join(SWEEP_OVER)}")
        need(self.preset is None or self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}")
        for name in ("ttft_limit_s", "tpot_limit_s"):
            value = getattr(self, name)
            need(value is None or value > 0, f"{name} must be positive")
        need(self.input_len >= 1 and self.output_len >= 1, "input_len and output_len must be at least 1")
        need(self.length_dist in DISTRIBUTIONS, f"length_dist must be one of {', '.join(DISTRIBUTIONS)}")
        need(self.length_spread >= 0, "length_spread must not be negative")
        need(self.dataset_format in FILE_FORMATS, f"dataset_format must be one of {', '.join(FILE_FORMATS)}")
        need(self.gpus is None or self.gpus >= 1, "gpus must be at least 1")
        need(self.workers >= 1, "workers must be at least 1")
        need(self.workers == 1 or self.engine == "openai", "workers > 1 needs the openai engine")
        need(self.api in APIS, f"api must be one of {', '.join(APIS)}, not {self.api!r}")
        need(self.request_timeout_s > 0, "request_timeout_s must be positive")
        need(self.max_consecutive_errors >= 1, "max_consecutive_errors must be at least 1")
        need(bool(self.rack) and bool(self.node), "rack and node must not be empty")
        need(not self.sim_warm_start or self.engine == "sim", "sim_warm_start applies to the sim engine only")
        if self.engine == "openai":
            need(bool(self.url), "the openai engine needs a server URL (url / --url)")
        if self.scenario == "server":
            need(self.rate is not None, "the server scenario needs a target rate (rate / --rate)")
        if self.scenario == "concurrency":
            need(self.concurrency is not None, "the concurrency scenario needs concurrency (--concurrency)")
        if self.scenario == "sweep":
            need(bool(self.sweep), "the sweep scenario needs a list of points (sweep / --sweep)")
            if self.sweep_over == "concurrency":
                need(
                    all(v >= 1 and float(v).is_integer() for v in self.sweep),
                    "sweep concurrencies must be whole numbers of at least 1",
                )
            else:
                need(all(v > 0 and math.isfinite(v) for v in self.sweep), "sweep rates must be positive")
        return self

    # --- derived -------------------------------------------------------------------------
    @property
    def bounded(self) -> bool:
        return self.requests is not None or self.duration_s is not None

    def limits(self) -> Limits | None:
        """Latency limits: explicit ones over the preset; the server preset by default for
        the server scenario and rate sweeps; none otherwise."""
        explicit = self.ttft_limit_s is not None or self.tpot_limit_s is not None
        rate_based = self.scenario == "server" or (self.scenario == "sweep" and self.sweep_over == "rate")
        if self.preset is None and not explicit and not rate_based:
            return None
        base = PRESETS[self.preset or "server"]
        return Limits(
            ttft_s=self.ttft_limit_s if self.ttft_limit_s is not None else base.ttft_s,
            tpot_s=self.tpot_limit_s if self.tpot_limit_s is not None else base.tpot_s,
        )


# Expected type of each field for from_dict: (python type, allow float->int coercion ...).
_FIELD_TYPES: dict[str, str] = {
    "engine": "str", "model": "str", "scenario": "str", "requests": "int", "duration_s": "float",
    "warmup_requests": "int", "warmup_s": "float", "warmup_auto": "bool", "concurrency": "int", "rate": "float",
    "sweep": "floats", "sweep_over": "str", "preset": "str", "ttft_limit_s": "float",
    "tpot_limit_s": "float", "offline_inflight": "int", "input_len": "int", "output_len": "int",
    "length_dist": "str", "length_spread": "float", "dataset": "str", "dataset_format": "str",
    "seed": "int", "rack": "str", "node": "str", "gpus": "int", "gpu_model": "str", "workers": "int",
    "url": "str", "api": "str", "api_key": "str", "request_timeout_s": "float",
    "max_consecutive_errors": "int", "run_id": "str", "sim_warm_start": "bool",
}


def _coerce(name: str, value: Any, kind: str) -> Any:
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, not {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, not {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
            raise ConfigError(f"{name} must be a whole number, not {value!r}")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a number, not {value!r}")
        return float(value)
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p.strip()]
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        raise ConfigError(f"{name} must be a list of numbers, not {value!r}")
    out = []
    for p in parts:
        try:
            number = float(p)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a list of numbers; {p!r} is not one") from None
        if isinstance(p, bool) or not math.isfinite(number):
            raise ConfigError(f"{name} must be a list of numbers; {p!r} is not one")
        out.append(number)
    return tuple(out)


def make_dataset(config: RunConfig, content: str | None = None) -> Dataset:
    """The configured dataset. ``content`` says what synthetic requests carry; by default
    only lengths for the simulated engine, a text prompt for the others."""
    if config.dataset:
        return load_dataset(config.dataset, config.dataset_format)
    return SyntheticDataset(
        input_len=config.input_len,
        output_len=config.output_len,
        distribution=config.length_dist,
        spread=config.length_spread,
        seed=config.seed,
        content=content or ("lengths" if config.engine == "sim" else "text"),
    )


# --- one request in flight ------------------------------------------------------------------
class _Flight:
    """A request in flight and the record it fills. Events after the window's deadline are
    ignored: the request is then stopped with what it had at the deadline."""

    __slots__ = (
        "before", "cancel_fn", "carried", "done", "job", "last_t", "measured", "opaque", "rec", "run", "task",
    )

    def __init__(self, run: _Runner, rec: RequestRecord, measured: bool) -> None:
        self.run = run
        self.rec = rec
        self.measured = measured
        self.carried = False  # in flight (unmeasured) when the window opened
        self.before: int | None = None  # its output tokens at that moment, when known
        self.opaque = False  # the engine reports the request only when it ends
        self.done = False
        self.last_t = rec.start_s
        self.cancel_fn: Callable[[], None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.job: Any = None  # the simulated engine's handle: its token count so far, on demand

    def on_event(self, ev: EngineEvent) -> None:
        if self.done:
            return
        deadline = self.run.deadline
        if deadline is not None and ev.t > deadline:
            return
        rec = self.rec
        kind = type(ev)
        if kind is Tokens:
            assert isinstance(ev, Tokens)
            rec.output_tokens += ev.count
            self.run.tokens_received += ev.count
            if self.run.keep_gaps:
                gaps = rec.itl_s if rec.itl_s is not None else []
                gaps.append(ev.t - self.last_t)
                if ev.count > 1:  # several tokens in one arrival reached us together
                    gaps.extend([0.0] * (ev.count - 1))
                rec.itl_s = gaps
            self.last_t = ev.t
        elif kind is FirstToken:
            assert isinstance(ev, FirstToken)
            rec.first_token_s = ev.t
            rec.output_tokens = ev.count
            self.run.tokens_received += ev.count
            if ev.count > 1 and self.run.keep_gaps:
                rec.itl_s = [0.0] * (ev.count - 1)
            self.last_t = ev.t
        elif kind is Done:
            assert isinstance(ev, Done)
            rec.end_s = ev.t
            rec.ok = True
            if ev.input_tokens:
                rec.input_tokens = ev.input_tokens
            self.run.tokens_received += max(0, ev.output_tokens - rec.output_tokens)
            rec.output_tokens = ev.output_tokens
            rec.output_tokens_method = ev.output_tokens_method
            rec.gpu = ev.gpu
            if rec.first_token_s is None:  # an engine that sends everything at the end
                rec.first_token_s = ev.t
            self.run.finish(self)
        elif kind is Failed:
            assert isinstance(ev, Failed)
            rec.end_s = ev.t
            rec.ok = False
            rec.error_type = ev.error_type
            rec.error = ev.message
            self.run.tokens_received += max(0, ev.output_tokens - rec.output_tokens)
            rec.output_tokens = max(rec.output_tokens, ev.output_tokens)
            self.run.finish(self)

    def stop(self, t: float, why: str) -> None:
        """Stop it where it is (deadline, cancel or abort): recorded as ``cancelled``."""
        if self.done:
            return
        rec = self.rec
        if self.job is not None:  # a simulated request cut short: the tokens it had by now count
            so_far = int(self.job.tokens_so_far)
            if so_far > rec.output_tokens:
                self.run.tokens_received += so_far - rec.output_tokens
                rec.output_tokens = so_far
        rec.ok = False
        rec.end_s = t
        rec.error_type = CANCELLED
        rec.error = why
        self.run.finish(self)
        if self.cancel_fn is not None:
            self.cancel_fn()
        if self.task is not None:
            self.task.cancel()


@dataclass
class _PhaseSpec:
    kind: str  # offline, server, concurrency
    concurrency: int | None = None
    rate: float | None = None
    point: dict[str, float] | None = None
    label: str = "measure"


class _Runner:
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
        self.submit = getattr(engine, "submit", None)  # callback fast path (simulated engine)
        self.record_fn = getattr(engine, "record", None)  # whole-request fast path (openai)
        if virtual is not None and not (self.submit and hasattr(engine, "run_until") and hasattr(engine, "step")):
            raise ConfigError(f"a virtual clock needs an engine that runs on virtual time, not {engine.name!r}")
        # Token gaps (ITL) are kept for engines that stream real arrivals; the simulated
        # engine's gaps are its iteration times, not worth a float per token of memory.
        self.keep_gaps = self.submit is None
        # Streaming engines report every token when a run may be cut at a deadline, so the
        # tokens they had by then count. Simulated requests report only first token and end
        # (a per-token callback would cost ~1M calls/s for a rack); a cut-short one is asked
        # for its count when stopped.
        self.stream_tokens = config.duration_s is not None and self.submit is None
        self.tokens_received = 0  # output tokens seen from any request, warm-up included
        self.deadline: float | None = None
        self.inflight: set[_Flight] = set()
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
            engine: Any = self.engine
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
        flight = _Flight(self, rec, measured)
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
        elif self.record_fn is not None and not self.stream_tokens:
            flight.opaque = True
            flight.task = asyncio.create_task(self._record_task(flight, request))
        else:
            flight.task = asyncio.create_task(self._stream_task(flight, request))

    async def _record_task(self, flight: _Flight, request: Request) -> None:
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
        scheduled = flight.rec.start_s
        rec.start_s = min(scheduled, rec.start_s)  # open-loop arrivals count from their schedule
        flight.rec = rec
        self.tokens_received += rec.output_tokens
        if rec.end_s is None:
            rec.end_s = self.now()
        self.finish(flight)

    async def _stream_task(self, flight: _Flight, request: Request) -> None:
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

    def finish(self, flight: _Flight) -> None:
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
        hint = getattr(self.engine, "max_inflight", None)
        if counted or not isinstance(hint, int) or hint < 1:
            return default
        return min(hint, default) if self.submit is None else hint

    def _warmup_mode(self, spec: _PhaseSpec) -> str:
        cfg = self.config
        if cfg.warmup_requests:
            return "requests"
        if cfg.warmup_s:
            return "seconds"
        if cfg.warmup_auto and spec.kind == "offline" and cfg.duration_s is not None:
            return "auto"
        return "none"

    async def run_phase(self, spec: _PhaseSpec, seed: int) -> Phase:
        cfg = self.config
        now = self.now()
        phase = Phase(records=[], start_s=now, end_s=now, point=spec.point, target_rate_per_s=spec.rate)
        self.phase = phase
        self.measuring = False
        self.deadline = None
        self.issued_measured = self.issued_warmup = 0
        self.done_measured = self.failed_measured = self.tokens_measured = 0
        self.last_end_s = None
        warm = self._warmup_mode(spec)
        # A requests-bounded offline run's warm-up batch drains before the measured batch goes
        # out (one query, as MLPerf); a duration-bounded one measures a saturated engine, so
        # there, as elsewhere and for the automatic ramp-up, the load carries straight on.
        drain = spec.kind == "offline" and warm in ("requests", "seconds") and cfg.duration_s is None
        warm_until = now + (cfg.warmup_s if warm == "seconds" else AUTO_WARMUP_MAX_S if warm == "auto" else 0.0)
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
                    history.append(prev)
                    ramped = _ramp_over(history)
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
    model = getattr(engine, "model", "") or config.model
    telemetry = WorkloadTelemetry(meter, rack=config.rack, node=config.node, model=model, engine=engine.name)
    runner = _Runner(
        engine, config, dataset,
        virtual=clock if isinstance(clock, VirtualClock) else None,
        energy=energy, telemetry=telemetry, progress=progress, cancel=cancel,
    )
    started_at = now_utc()
    phases: list[Phase] = []
    telemetry.run_started(run_id, config.scenario)
    cancelled_task = False
    watcher = None
    if cancel is not None and runner.virtual is None:
        watcher = asyncio.create_task(_wake_on(cancel, runner.wake))
    try:
        for i, spec in enumerate(_specs(config)):
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
        telemetry.run_ended()
        if watcher is not None:
            watcher.cancel()
    if not phases:
        now = runner.now()
        phases.append(Phase([], now, now, complete=False, stop_reason="cancelled"))
    engine_gpus = getattr(engine, "gpus", None)
    result = build_result(
        config, phases, engine=engine.name, model=model, dataset=dataset, started_at=started_at,
        gpu_models=_gpu_models(engine, config),
        gpus=config.gpus or (len(engine_gpus) if isinstance(engine_gpus, list) else None),
    )
    if cancelled_task:
        log.info("run %s cancelled; returning a partial result", run_id)
    return result


def build_result(
    config: RunConfig,
    phases: list[Phase],
    *,
    engine: str,
    model: str,
    dataset: Dataset,
    started_at: datetime,
    gpu_models: list[str],
    gpus: int | None,
) -> RunResult:
    """A ``RunResult`` around measured phases (``config.run_id`` must be set)."""
    assert config.run_id is not None
    env = environment(
        engine=engine,
        model=model,
        gpu_models=gpu_models,
        records=(r for p in phases for r in p.records),
        extra={"simulated": engine == "sim", "dataset": dataset.describe()},
    )
    return RunResult(
        run_id=config.run_id,
        config=config.to_dict(),
        environment=env,
        started_at=started_at,
        ended_at=now_utc(),
        phases=phases,
        node=config.node,
        gpus=gpus,
        limits=config.limits(),
        sweep=config.scenario == "sweep",
    )


# --- several client processes (openai) -----------------------------------------------------
def run_with_workers(
    config: RunConfig,
    *,
    stop: threading.Event | None = None,
    dataset: Dataset | None = None,
    meter: Meter | None = None,
) -> RunResult:
    """Run the scenario over ``config.workers`` client processes (``runner.workers``), for
    loads one process cannot stream. Blocking: call it in a thread from async code.

    Each phase is a fixed list of requests (``requests``, after ``warmup_requests``), so a
    requests bound is required; ``duration_s`` caps each phase (requests still in flight at
    that moment are stopped without their partial tokens, and the window ends there).
    Energy is not read on this path.
    """
    from functools import partial

    from rackscope.runner.engines.openai import OpenAIEngine
    from rackscope.runner.workers import run_workers

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
    factory = partial(
        OpenAIEngine, config.url, config.model, "chat" if config.api == "chat" else "completions",
        config.api_key, timeout_s=config.request_timeout_s,
    )
    telemetry = WorkloadTelemetry(meter, rack=config.rack, node=config.node, model=config.model, engine="openai")
    stop = stop if stop is not None else threading.Event()
    started_at = now_utc()
    phases: list[Phase] = []
    index = 0
    telemetry.run_started(config.run_id or "", config.scenario)
    try:
        for i, spec in enumerate(_specs(config)):
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
            try:
                run = run_workers(
                    requests, factory, config.workers, concurrency=concurrency, arrivals_s=arrivals, stop=stop
                )
            finally:
                if timer is not None:
                    timer.cancel()
            for rec in run.records:
                telemetry.record(rec)
            warm_ids = {r.request_id for r in requests[:n_warm]}
            phase = _phase_from_records(run.records, warm_ids, run.start_s, run.end_s, spec)
            if timed_out.is_set():
                stop.clear()
                phase.stop_reason, phase.complete = "duration", True
                phase.end_s = min(phase.end_s, phase.start_s + config.duration_s) if config.duration_s else phase.end_s
            elif run.interrupted:
                phase.stop_reason, phase.complete = "cancelled", False
            elif _trailing_errors(phase.records) >= config.max_consecutive_errors:
                phase.stop_reason, phase.complete = "errors", False
            phases.append(phase)
            if not phase.complete:
                break
    finally:
        telemetry.run_ended()
    return build_result(
        config, phases, engine="openai", model=config.model, dataset=dataset, started_at=started_at,
        gpu_models=[config.gpu_model] if config.gpu_model else [], gpus=config.gpus,
    )


def _phase_from_records(
    records: list[RequestRecord], warm_ids: set[str], start_s: float, end_s: float, spec: _PhaseSpec
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


def _trailing_errors(records: list[RequestRecord]) -> int:
    n = 0
    for r in sorted(records, key=lambda r: r.end_s or 0.0, reverse=True):
        if r.ok or r.error_type == CANCELLED:
            break
        n += 1
    return n


def _ramp_over(history: list[tuple[float, int]]) -> bool:
    """True once the output rate of the last span is no more than AUTO_WARMUP_GROWTH above
    the rate of the span before it (and tokens are flowing)."""
    t_end, n_end = history[-1]
    if t_end - history[0][0] < 2 * AUTO_WARMUP_SPAN_S:
        return False

    def tokens_at(t: float) -> float:
        for (t0, n0), (t1, n1) in itertools.pairwise(history):
            if t0 <= t <= t1:
                return n0 + (n1 - n0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
        return float(history[0][1])

    mid, start = t_end - AUTO_WARMUP_SPAN_S, t_end - 2 * AUTO_WARMUP_SPAN_S
    recent = n_end - tokens_at(mid)
    before = tokens_at(mid) - tokens_at(start)
    return recent > 0 and recent <= before * (1.0 + AUTO_WARMUP_GROWTH)


async def _wake_on(event: asyncio.Event, wake: asyncio.Event) -> None:
    await event.wait()
    wake.set()


def _specs(config: RunConfig) -> list[_PhaseSpec]:
    if config.scenario == "sweep":
        base = "server" if config.sweep_over == "rate" else "concurrency"
        specs = []
        for value in config.sweep:
            if base == "server":
                specs.append(_PhaseSpec("server", rate=value, point={"rate": value}, label=f"rate={value:g}"))
            else:
                n = int(value)
                specs.append(
                    _PhaseSpec("concurrency", concurrency=n, point={"concurrency": n}, label=f"concurrency={n}")
                )
        return specs
    return [_PhaseSpec(config.scenario, concurrency=config.concurrency, rate=config.rate)]


def _gpu_models(engine: Engine, config: RunConfig) -> list[str]:
    gpus = getattr(engine, "gpus", None)
    if isinstance(gpus, list) and gpus and all(isinstance(g, SimGpu) for g in gpus):
        return sorted({g.profile.name for g in gpus})
    return [config.gpu_model] if config.gpu_model else []
