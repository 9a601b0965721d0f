"""What the openai engine and its worker processes report while requests are still running:
the tokens received so far (``live_output_tokens``, the workers' shared counters), records as
they finish, progress about once a second; and when a request starts (its bytes going out)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from functools import partial

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from rackscope import contract
from rackscope.runner.config import RunConfig
from rackscope.runner.engines.base import CountsLiveTokens, Request
from rackscope.runner.engines.openai import OpenAIEngine
from rackscope.runner.multiprocess import run_with_workers
from rackscope.runner.progress import Progress
from rackscope.runner.records import RequestRecord
from rackscope.runner.workers import LiveTokens, WorkerProgress, run_workers
from tests.runner.streaming_server import Behaviour, StreamingServer


@pytest.fixture
def server() -> Iterator[StreamingServer]:
    with StreamingServer() as s:
        yield s


def req(rid: str, tokens: int, **x_test: object) -> Request:
    return Request(request_id=rid, prompt="hi", max_output_tokens=tokens, extra={"x_test": x_test})


async def test_live_output_tokens_follow_requests_in_flight(server: StreamingServer) -> None:
    engine = OpenAIEngine(server.base_url, "test-model")
    assert isinstance(engine, CountsLiveTokens)
    await engine.start()
    assert engine.live_output_tokens() == {}
    before = engine.now()
    tasks = [asyncio.create_task(engine.record(req(f"r{i}", 30, itl_s=0.01))) for i in range(2)]
    seen: list[int] = []
    while not any(t.done() for t in tasks):
        seen.append(sum(engine.live_output_tokens().values()))
        await asyncio.sleep(0.02)
    records = await asyncio.gather(*tasks)
    assert engine.live_output_tokens() == {}  # gone by the time record returned them
    assert all(r.ok and r.output_tokens == 30 for r in records)
    # Counted while they streamed, never more than both requests held.
    assert max(seen) > 0
    assert max(seen) <= 60
    assert seen == sorted(seen)
    for rec in records:
        # The start is when the request went out: after record() was called, before any token.
        assert rec.start_s >= before
        assert rec.first_token_s is not None
        assert rec.start_s < rec.first_token_s
    await engine.stop()


async def test_stream_requests_are_not_counted_live(server: StreamingServer) -> None:
    # The run loop counts what stream() yields itself; only record() requests are the engine's to count.
    engine = OpenAIEngine(server.base_url, "test-model")
    await engine.start()
    counts = []
    async for _ in engine.stream(req("s", 10, itl_s=0.005)):
        counts.append(engine.live_output_tokens())
    assert counts == [{}] * len(counts)
    await engine.stop()


@pytest.mark.slow
def test_worker_run_reports_tokens_records_and_progress_while_it_runs(server: StreamingServer) -> None:
    server.behaviour = Behaviour(itl_s=0.025)
    reqs = [req(f"w{i}", 60) for i in range(8)]  # 1.5 s each, two waves of four
    live = LiveTokens()
    batches: list[tuple[float, list[RequestRecord]]] = []
    progress: list[WorkerProgress] = []
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), live.output_tokens()))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run = run_workers(
            reqs, partial(OpenAIEngine, server.base_url, "test-model"), workers=2, concurrency=4, live=live,
            on_records=lambda recs: batches.append((time.perf_counter(), recs)), on_progress=progress.append,
        )
    finally:
        done.set()
        sampler.join()
    assert [r.output_tokens for r in run.records] == [60] * 8
    assert live.output_tokens() == 0  # nothing in flight once the run is over
    # Records came in as they finished, not all at the end, and every one exactly once.
    assert sorted(r.request_id for _, recs in batches for r in recs) == sorted(r.request_id for r in reqs)
    first_record_at = batches[0][0]
    assert batches[-1][0] - first_record_at > 0.5
    # The parent saw tokens of requests still in flight before any request had finished.
    assert any(value > 0 for t, value in samples if t < first_record_at)
    assert max(value for _, value in samples) <= 4 * 60
    # Progress about once a second, with what was received so far.
    assert len(progress) >= 2
    assert progress[0].output_tokens > 0
    tokens = [p.output_tokens for p in progress]
    assert tokens == sorted(tokens)
    assert tokens[-1] <= 8 * 60
    assert any(p.in_flight > 0 for p in progress)


def exported_output_tokens(reader: InMemoryMetricReader) -> int:
    data = reader.get_metrics_data()
    total = 0
    for rm in data.resource_metrics if data is not None else []:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name != contract.TOKENS.otel_name:
                    continue
                for p in m.data.data_points:
                    if isinstance(p, NumberDataPoint) and (p.attributes or {}).get("gen_ai.token.type") == "output":
                        total += int(p.value)
    return total


@pytest.mark.slow
def test_several_workers_feed_the_token_counter_while_they_run(server: StreamingServer) -> None:
    server.behaviour = Behaviour(itl_s=0.025)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    config = RunConfig.from_dict({
        "engine": "openai", "url": server.base_url, "model": "test-model", "node": "n01", "workers": 2,
        "scenario": "concurrency", "concurrency": 4, "requests": 4, "output_len": 60, "input_len": 8,
        "warmup_auto": False,
    })
    reports: list[Progress] = []
    result: list[object] = []
    runner = threading.Thread(target=lambda: result.append(
        run_with_workers(config, meter=provider.get_meter("t"), progress=reports.append)))
    samples: list[int] = []
    runner.start()
    while runner.is_alive():
        samples.append(exported_output_tokens(reader))
        time.sleep(0.05)
    runner.join()
    final = exported_output_tokens(reader)
    provider.shutdown()
    assert result, "the run raised"
    assert final == 4 * 60
    # Before the requests (1.5 s each, all at once) ended, the counter was already climbing.
    assert any(0 < value < 4 * 60 for value in samples)
    assert samples == sorted(samples)
    assert reports
    assert reports[0].output_tokens > 0
