"""Output tokens counted as they stream: ``rackscope.tokens`` collected while requests are still
running, through an SDK in-memory reader, for the simulated engine, the openai engine against a
real streaming server, and a whole-request engine that counts its open requests itself."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from rackscope import contract
from rackscope.clock import VirtualClock, WallClock
from rackscope.runner.config import RunConfig
from rackscope.runner.engines.base import (
    CountsLiveTokens,
    Done,
    EngineEvent,
    FirstToken,
    RecordsWholeRequests,
    Request,
    Tokens,
)
from rackscope.runner.engines.sim import SimEngine
from rackscope.runner.progress import Progress
from rackscope.runner.records import RequestRecord
from rackscope.runner.runloop import run_scenario
from rackscope.runner.telemetry import WorkloadTelemetry
from rackscope.simgpu import SimGpu, profile


def output_tokens(reader: InMemoryMetricReader) -> dict[str, int]:
    """gpu -> the exported output-token counter, collected now."""
    data = reader.get_metrics_data()
    out: dict[str, int] = {}
    if data is None:
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == contract.TOKENS.otel_name:
                    for p in m.data.data_points:
                        if p.attributes["gen_ai.token.type"] == "output":
                            out[str(p.attributes["gpu"])] = int(p.value)
    return out


def rec(rid: str, out: int, *, gpu: int | None = 0, ok: bool = True, error_type: str | None = None) -> RequestRecord:
    return RequestRecord(rid, 0.0, 0.25, 1.25, 10, out, "engine", ok, error_type, None, None, gpu)


# --- the counter itself ------------------------------------------------------------------------------
def test_live_tokens_are_added_and_the_counter_never_goes_down(
    reader: tuple[InMemoryMetricReader, MeterProvider],
) -> None:
    r, provider = reader
    t = WorkloadTelemetry(provider.get_meter("t"), rack="r1", node="n01", model="m", engine="openai")
    live: dict[int | None, int] = {None: 40, 1: 7}
    stop = t.add_live_source(lambda: dict(live))
    assert output_tokens(r) == {"all": 40, "1": 7}
    live[None] = 55
    assert output_tokens(r) == {"all": 55, "1": 7}
    # The request on "all" ends; the server's usage says 52 where 55 chunks were counted.
    live[None] = 0
    t.record(rec("a", 52, gpu=None))
    assert output_tokens(r) == {"all": 55, "1": 7}  # held, not 52
    live[None] = 2  # the next request's first tokens: 54 in truth, still below what was reported
    assert output_tokens(r)["all"] == 55
    live[None] = 10  # 62 in truth: climbing again, exactly
    assert output_tokens(r)["all"] == 62
    # A failed request keeps what it received; a cancelled one with nothing recorded holds too.
    live[1] = 0
    t.record(rec("b", 7, gpu=1, ok=False, error_type="http_5xx"))
    assert output_tokens(r)["1"] == 7
    live[None] = 0
    t.record(rec("c", 0, gpu=None, ok=False, error_type="cancelled"))
    assert output_tokens(r)["all"] == 62
    stop()
    assert output_tokens(r) == {"all": 62, "1": 7}  # unregistered: finished totals, never lower
    t.record(rec("d", 100, gpu=None))
    assert output_tokens(r)["all"] == 152


def test_sources_add_up_and_a_broken_one_is_skipped(
    reader: tuple[InMemoryMetricReader, MeterProvider], caplog: pytest.LogCaptureFixture
) -> None:
    r, provider = reader
    meter = provider.get_meter("t")
    a = WorkloadTelemetry(meter, rack="r1", node="n01", model="m", engine="sim")
    b = WorkloadTelemetry(meter, rack="r1", node="n01", model="m", engine="sim")
    a.add_live_source(lambda: {0: 5})
    b.add_live_source(lambda: {0: 6, 1: 0})

    def broken() -> dict[int | None, int]:
        raise RuntimeError("gone")

    b.add_live_source(broken)
    assert output_tokens(r) == {"0": 11}  # same attribute set: one cell; a zero makes no series
    assert output_tokens(r) == {"0": 11}
    assert sum("live token source failed" in rec.getMessage() for rec in caplog.records) == 1


# --- the simulated engine ------------------------------------------------------------------------------
async def test_sim_counts_tokens_of_requests_still_running(
    reader: tuple[InMemoryMetricReader, MeterProvider],
) -> None:
    r, provider = reader
    clock = VirtualClock()
    gpus = [SimGpu(i, profile("h100"), clock) for i in range(2)]
    engine = SimEngine(gpus, clock)
    await engine.start()
    seen: list[tuple[dict[str, int], dict[str, int], int]] = []

    def progress(_p: Progress) -> None:
        # Collected where the run loop stands: the counter must equal what the GPUs generated.
        st = engine.stats()
        generated = {str(g.gpu): g.output_tokens for g in st.gpus if g.output_tokens}
        seen.append((output_tokens(r), generated, sum(g.requests_done for g in st.gpus)))

    # 4,000-token outputs: no request ends in the first minute of this run.
    cfg = RunConfig.from_dict({"engine": "sim", "node": "n01", "scenario": "concurrency", "concurrency": 16,
                               "duration_s": 90.0, "input_len": 64, "output_len": 4000, "warmup_auto": False})
    await run_scenario(engine, cfg, clock=clock, meter=provider.get_meter("t"), progress=progress)
    final = output_tokens(r)
    final_generated = {str(g.gpu): g.output_tokens for g in engine.stats().gpus}
    await engine.stop()
    early = [(counter, generated) for counter, generated, done in seen if done == 0 and generated]
    assert len(early) > 10
    for counter, generated in early:
        assert counter == generated  # live, exact, per GPU, though no request has ended
    for (before, _, _), (after, _, _) in itertools.pairwise(seen):
        assert all(after.get(gpu, 0) >= value for gpu, value in before.items())
    # Stopped at the deadline, each request counts what it had: the counter is what was generated.
    assert final == final_generated
    assert all(final[gpu] >= seen[-1][0].get(gpu, 0) for gpu in final)


# --- the openai engine against a streaming server ------------------------------------------------------
def arrivals(records: list[RequestRecord]) -> list[float]:
    """Every token's arrival time on the engine's clock, from the records' first token and gaps."""
    times: list[float] = []
    for record in records:
        if record.first_token_s is None:
            continue
        t = record.first_token_s
        times.append(t)
        for gap in record.itl_s or []:
            t += gap
            times.append(t)
    return sorted(times)


@pytest.mark.slow
async def test_openai_streamed_tokens_count_within_one_collection(
    reader: tuple[InMemoryMetricReader, MeterProvider],
) -> None:
    from rackscope.runner.engines.openai import OpenAIEngine
    from tests.runner.streaming_server import Behaviour, StreamingServer

    r, provider = reader
    with StreamingServer(Behaviour(ttft_s=0.05, itl_s=0.005, models=["m"])) as server:
        engine = OpenAIEngine(server.base_url, "m")
        await engine.start()
        # A requests bound: whole-request calls, whose tokens the engine counts while they are open.
        cfg = RunConfig.from_dict({"engine": "openai", "url": server.base_url, "model": "m", "node": "n01",
                                   "scenario": "concurrency", "concurrency": 2, "requests": 4, "output_len": 120,
                                   "input_len": 8, "warmup_auto": False})
        run = asyncio.create_task(run_scenario(engine, cfg, meter=provider.get_meter("t")))
        samples: list[tuple[float, int]] = []
        while not run.done():
            samples.append((engine.now(), output_tokens(r).get("all", 0)))
            await asyncio.sleep(0.03)
        result = await run
        samples.append((engine.now(), output_tokens(r).get("all", 0)))
        await engine.stop()
    assert result.summary["requests_completed"] == 4
    times = arrivals(result.records)
    assert len(times) == 4 * 120
    first_end = min(rec.end_s for rec in result.records if rec.end_s is not None)
    assert any(value > 0 for t, value in samples if t < first_end)  # counted before any request ended
    for (t0, _), (t1, value) in itertools.pairwise(samples):
        # Everything that arrived before the previous collection is in this one; nothing counts
        # before it arrived.
        assert sum(1 for a in times if a <= t0) <= value <= sum(1 for a in times if a <= t1)
    values = [v for _, v in samples]
    assert values == sorted(values)
    assert values[-1] == 4 * 120


@pytest.mark.slow
async def test_openai_failed_and_cancelled_requests_keep_the_counter_monotonic(
    reader: tuple[InMemoryMetricReader, MeterProvider],
) -> None:
    from rackscope.runner.engines.openai import OpenAIEngine
    from tests.runner.streaming_server import Behaviour, StreamingServer

    r, provider = reader
    meter = provider.get_meter("t")
    with StreamingServer(Behaviour(itl_s=0.01, fail_after=30, failure="close", models=["m"])) as server:
        engine = OpenAIEngine(server.base_url, "m")
        await engine.start()
        base = {"engine": "openai", "url": server.base_url, "model": "m", "node": "n01", "input_len": 8,
                "warmup_auto": False}
        failing = await run_scenario(engine, RunConfig.from_dict(
            {**base, "scenario": "concurrency", "concurrency": 1, "requests": 1, "output_len": 100}), meter=meter)
        assert failing.records[0].ok is False
        assert failing.records[0].output_tokens == 30
        assert output_tokens(r)["all"] == 30
        server.behaviour = Behaviour(itl_s=0.01, models=["m"])
        cancel = asyncio.Event()
        run = asyncio.create_task(run_scenario(engine, RunConfig.from_dict(
            {**base, "scenario": "concurrency", "concurrency": 2, "requests": 2, "output_len": 1000}),
            meter=meter, cancel=cancel))
        values = []
        while output_tokens(r)["all"] < 30 + 40:
            values.append(output_tokens(r)["all"])
            await asyncio.sleep(0.02)
        cancel.set()
        cut = await run
        values.append(output_tokens(r)["all"])
        await engine.stop()
    assert cut.summary["requests_cancelled"] == 2
    assert values == sorted(values)
    # Whole-request calls cut short keep no partial count in their records, but the tokens did
    # arrive and were counted live: the counter holds what it reported rather than going back.
    assert all(rec.output_tokens == 0 for rec in cut.records)
    assert values[-1] >= 30 + 40
    assert output_tokens(r)["all"] == values[-1]


# --- a whole-request engine that counts its open requests itself ---------------------------------------
class TickEngine:
    """A stand-in engine that makes one token per ``tick_s`` on the wall clock."""

    name = "tick"
    model = "m"

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self.streamed = 0
        self._clock = WallClock()

    def now(self) -> float:
        return self._clock.now()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class CountingEngine(TickEngine, RecordsWholeRequests, CountsLiveTokens):
    """Answers each request after ``tokens`` ticks of ``tick_s``, one token per tick, and says
    how many tokens its open requests hold: the shape an HTTP client's record path has."""

    name = "counting"

    def __init__(self, tick_s: float) -> None:
        super().__init__(tick_s)
        self.open: dict[str, int] = {}

    async def stream(self, request: Request) -> AsyncIterator[EngineEvent]:
        self.streamed += 1  # the run loop should not come here: counted to check it does not
        record = await self.record(request)
        yield Done(self.now(), record.input_tokens, record.output_tokens, "counted")

    def live_output_tokens(self) -> dict[int | None, int]:
        return {None: sum(self.open.values())}

    async def record(self, request: Request) -> RequestRecord:
        start = self.now()
        self.open[request.request_id] = 0
        try:
            for _ in range(request.max_output_tokens):
                await asyncio.sleep(self.tick_s)
                self.open[request.request_id] += 1
        finally:
            tokens = self.open.pop(request.request_id)
        return RequestRecord(request.request_id, start, start + self.tick_s, self.now(), request.input_tokens,
                             tokens, "counted", True)


async def test_whole_request_engine_counting_its_open_requests_stays_on_its_path(
    reader: tuple[InMemoryMetricReader, MeterProvider],
) -> None:
    r, provider = reader
    engine = CountingEngine(tick_s=0.002)
    cfg = RunConfig.from_dict({"engine": "sim", "node": "n01", "scenario": "concurrency", "concurrency": 3,
                               "requests": 3, "output_len": 100, "input_len": 8, "warmup_auto": False})
    run = asyncio.create_task(run_scenario(engine, cfg, meter=provider.get_meter("t")))
    checked = 0
    while not run.done():
        open_now = engine.live_output_tokens()[None]
        if 0 < open_now < 300:
            assert output_tokens(r).get("all", 0) == open_now  # same loop: exact
            checked += 1
        await asyncio.sleep(0.01)
    result = await run
    assert engine.streamed == 0
    assert checked > 3
    assert result.summary["requests_completed"] == 3
    assert output_tokens(r) == {"all": 300}


class WholeRequestEngine(TickEngine, RecordsWholeRequests):
    """Whole-request calls, and a stream, but no live count of its open requests."""

    name = "whole"

    def __init__(self, tick_s: float) -> None:
        super().__init__(tick_s)
        self.recorded = 0

    async def stream(self, request: Request) -> AsyncIterator[EngineEvent]:
        self.streamed += 1
        for i in range(request.max_output_tokens):
            await asyncio.sleep(self.tick_s)
            yield FirstToken(self.now()) if i == 0 else Tokens(self.now(), 1)
        yield Done(self.now(), request.input_tokens, request.max_output_tokens, "counted")

    async def record(self, request: Request) -> RequestRecord:
        self.recorded += 1
        start = self.now()
        await asyncio.sleep(self.tick_s * request.max_output_tokens)
        return RequestRecord(request.request_id, start, start + self.tick_s, self.now(), request.input_tokens,
                             request.max_output_tokens, "counted", True)


@pytest.mark.parametrize("exported", [True, False], ids=["meter", "no-meter"])
async def test_a_whole_request_engine_without_live_counts_streams_only_when_exported(
    reader: tuple[InMemoryMetricReader, MeterProvider], exported: bool
) -> None:
    r, provider = reader
    engine = WholeRequestEngine(tick_s=0.001)
    cfg = RunConfig.from_dict({"engine": "sim", "node": "n01", "scenario": "concurrency", "concurrency": 2,
                               "requests": 4, "output_len": 20, "input_len": 8, "warmup_auto": False})
    run = asyncio.create_task(run_scenario(engine, cfg, meter=provider.get_meter("t") if exported else None))
    seen = []
    while not run.done():
        seen.append(output_tokens(r).get("all", 0))
        await asyncio.sleep(0.002)
    result = await run
    assert result.summary["requests_completed"] == 4
    # Exported: streamed, so tokens count as they come; otherwise the cheaper whole-request path.
    assert (engine.streamed, engine.recorded) == ((4, 0) if exported else (0, 4))
    if exported:
        assert any(v % 20 for v in seen)  # a count between whole requests was seen
        assert output_tokens(r) == {"all": 80}


def test_a_run_without_a_meter_is_not_exported() -> None:
    assert WorkloadTelemetry(None, rack="r1", node="n01", model="m", engine="openai").exported is False
