"""The server view of an in-process engine: TensorRT-LLM's runtime statistics, drained from the
LLM API's ``get_stats_async`` while the run lasts, become the record's ``server`` section as
``trtllm-serve``'s JSON page would.

The engine runs on the stand-in ``tensorrt_llm`` module of ``engines/test_trtllm.py`` (the
vendor boundary); its LLM reports one iteration-stat record per generation step, in the shape
the real runtime gives (``pages/trtllm_iteration_stat_trt_backend.json``)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import pytest

from rackscope.clock import VirtualClock
from rackscope.engine_metrics.formats import EngineFormat, ModelReading, Reading, read_iteration_records, read_page
from rackscope.errors import EngineError, PeerError
from rackscope.runner import server_view
from rackscope.runner.config import RunConfig
from rackscope.runner.engines.base import ReportsIterationStats
from rackscope.runner.engines.trtllm import TrtllmEngine
from rackscope.runner.results.window import Phase
from rackscope.runner.runloop import run_scenario
from rackscope.runner.server_view import IN_PROCESS, EngineWatch, end_watch, watch_run
from tests.runner.engines.test_trtllm import (
    IterationResult,
    RequestOutput,
    SamplingParams,
    StandInLLMWithAsyncStats,
    stand_in_module,
)

PAGE = Path(__file__).parents[1] / "rackscope" / "engine_metrics" / "pages" / "trtllm_iteration_stat_trt_backend.json"
TEMPLATE: dict[str, Any] = json.loads(PAGE.read_text())
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PACE_S = 0.04  # real time per generation step, so the watch's task gets its turns meanwhile
TICK_S = 0.01  # the watch's interval in these tests


def iteration(n: int, *, active: int, queued: int, used: int, total: int) -> dict[str, Any]:
    """One record of the runtime's shape (the real one's fields), with these figures."""
    record = copy.deepcopy(TEMPLATE)
    record["iter"] = n
    record["numActiveRequests"] = active
    record["numQueuedRequests"] = queued
    record["kvCacheStats"] |= {"usedNumBlocks": used, "freeNumBlocks": total - used, "maxNumBlocks": total}
    return record


class PacedOutput(RequestOutput):
    async def __anext__(self) -> RequestOutput:
        await asyncio.sleep(PACE_S)
        out = await super().__anext__()
        llm = self.llm
        assert isinstance(llm, ReportingLLM)
        llm.iterations += 1
        llm.stats_records.append(iteration(llm.iterations, **llm.figures))
        return out


class ReportingLLM(StandInLLMWithAsyncStats):
    """Reports an iteration record per generation step, with the figures the test sets."""

    figures: ClassVar[dict[str, int]] = {"active": 3, "queued": 2, "used": 40, "total": 160}

    def __init__(self, clock: VirtualClock, **kwargs: Any) -> None:
        super().__init__(clock, **kwargs)
        self.iterations = 0
        self.drains = 0

    def generate_async(self, inputs: Any, sampling_params: SamplingParams, streaming: bool = False) -> RequestOutput:
        self.calls.append((inputs, sampling_params, streaming))
        result = PacedOutput(self, [len(word) for word in str(inputs).split()], sampling_params)
        self.results.append(result)
        return result

    def get_stats_async(self, timeout: float) -> IterationResult:
        self.drains += 1
        return super().get_stats_async(timeout)


class BrokenStatsLLM(ReportingLLM):
    def get_stats_async(self, timeout: float) -> IterationResult:
        self.drains += 1
        raise RuntimeError("iteration statistics are not available: the executor has shut down")


async def started(clock: VirtualClock, llm_class: type[ReportingLLM], **kwargs: Any) -> tuple[TrtllmEngine, Any]:
    module = stand_in_module(clock, llm_class)
    engine = TrtllmEngine(MODEL, module=module, clock=clock, **kwargs)
    await engine.start()
    return engine, module.built[0]


def config() -> RunConfig:
    return RunConfig.from_dict({"engine": "trtllm", "model": MODEL, "node": "n01", "scenario": "concurrency",
                                "concurrency": 2, "requests": 4, "output_len": 10, "input_len": 4,
                                "warmup_auto": False})


async def run_watched(engine: TrtllmEngine) -> dict[str, Any]:
    cfg = config()
    watch = await watch_run(cfg, engine)
    assert isinstance(watch, EngineWatch)
    result = await run_scenario(engine, cfg)
    await end_watch(watch, cfg, result)
    assert result.summary["requests_completed"] == 4
    assert result.summary.get("complete", True) is True
    assert isinstance(result.server, dict)
    return result.server


# ---------------------------------------------------------------- the records, read as the page reads


def test_records_read_as_the_same_records_on_the_page() -> None:
    records = [iteration(7, active=5, queued=1, used=10, total=40), iteration(8, active=6, queued=0, used=20,
                                                                             total=40)]
    from_records = read_iteration_records(records, model="m")
    as_strings = read_iteration_records([json.dumps(r) for r in records], model="m")
    from_page = read_page(json.dumps(records).encode(), model="m")
    assert from_records == as_strings == from_page
    assert from_records == Reading(EngineFormat.TRTLLM, (ModelReading("m", 6.0, 0.0, 0.5),))
    assert read_iteration_records([]) == Reading(EngineFormat.TRTLLM, ())


@pytest.mark.parametrize("bad", [["{not json"], [[1, 2]], [{"numActiveRequests": 1}]])
def test_records_that_are_not_iteration_statistics_are_a_peer_error(bad: list[object]) -> None:
    with pytest.raises(PeerError):
        read_iteration_records(bad)


# ---------------------------------------------------------------- the engine's reading


async def test_the_engine_reads_its_latest_iteration_and_none_when_nothing_ran() -> None:
    clock = VirtualClock(100.0)
    engine, llm = await started(clock, ReportingLLM)
    assert isinstance(engine, ReportsIterationStats)
    assert await engine.iteration_reading() is None
    llm.stats_records = [iteration(1, active=1, queued=4, used=8, total=64),
                         iteration(2, active=2, queued=3, used=16, total=64)]
    assert await engine.iteration_reading() == Reading(EngineFormat.TRTLLM, (ModelReading(MODEL, 2.0, 3.0, 0.25),))
    assert await engine.iteration_reading() is None  # drained


async def test_statistics_turned_off_are_an_engine_error() -> None:
    engine, _ = await started(VirtualClock(0.0), ReportingLLM, enable_iter_perf_stats=False)
    with pytest.raises(EngineError, match="enable_iter_perf_stats is off"):
        await engine.iteration_reading()


async def test_the_watch_sums_up_varying_readings_exactly() -> None:
    clock = VirtualClock(10.0)
    engine, llm = await started(clock, ReportingLLM)
    watch = EngineWatch(engine, model=MODEL, clock=engine.now, interval_s=3600.0)
    await watch.start()
    for n, (active, queued, used) in enumerate([(1, 0, 10), (4, 2, 30), (3, 1, 20)], start=1):
        clock.advance(1.0)
        llm.stats_records = [iteration(n, active=active, queued=queued, used=used, total=40)]
        await watch.read_once()
    await watch.stop(read_again=False)
    section = watch.section([Phase([], 10.5, 13.5)], cold_start=True)
    assert section["available"] is True
    assert (section["url"], section["format"], section["model"]) == (IN_PROCESS, "trtllm", MODEL)
    assert (section["samples"], section["scrapes"], section["failures"]) == (3, 4, 0)
    assert section["running_requests"] == {"mean": pytest.approx(8 / 3), "max": 4.0}
    assert section["waiting_requests"] == {"mean": 1.0, "max": 2.0}
    assert section["kv_cache_usage"] == {"mean": pytest.approx(0.5), "max": 0.75}
    assert section["output_tokens"] is None and section["truth_check"] is None


# ---------------------------------------------------------------- through a run


async def test_a_run_gets_the_runtime_statistics_as_its_server_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_view, "INTERVAL_S", TICK_S)
    engine, llm = await started(VirtualClock(100.0), ReportingLLM)
    server = await run_watched(engine)

    assert server["available"] is True
    assert server["url"] == IN_PROCESS
    assert server["format"] == "trtllm"
    assert server["model"] == MODEL
    assert server["samples"] >= 1
    assert llm.drains >= server["samples"]
    assert server["failures"] == 0
    # Exactly what the stand-in runtime reported on every iteration: 3 active, 2 queued, 40 of
    # 160 KV-cache blocks in use.
    assert server["running_requests"] == {"mean": 3.0, "max": 3.0}
    assert server["waiting_requests"] == {"mean": 2.0, "max": 2.0}
    assert server["kv_cache_usage"] == {"mean": 0.25, "max": 0.25}
    assert server["output_tokens"] is None and server["truth_check"] is None  # no counter of its own


async def test_a_runtime_that_cannot_report_leaves_the_view_unavailable_and_the_run_whole(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(server_view, "INTERVAL_S", TICK_S)
    engine, llm = await started(VirtualClock(100.0), BrokenStatsLLM)
    with caplog.at_level(logging.WARNING, logger="rackscope.runner.server_view"):
        server = await run_watched(engine)

    assert server["available"] is False
    assert server["url"] == IN_PROCESS
    assert "executor has shut down" in server["error"]
    assert server["failures"] == server["scrapes"] == llm.drains >= 2
    assert server["running_requests"] is None and server["kv_cache_usage"] is None
    warnings = [r for r in caplog.records if "runtime statistics are unavailable" in r.getMessage()]
    assert len(warnings) == 1  # logged once, however often the drain failed


class HungLLM(ReportingLLM):
    def get_stats_async(self, timeout: float) -> IterationResult:
        self.drains += 1
        return HungResult()


class HungResult(IterationResult):
    def __init__(self) -> None:
        super().__init__([])

    async def __anext__(self) -> dict[str, Any]:
        await asyncio.sleep(3600)
        raise StopAsyncIteration


async def test_a_drain_that_hangs_is_cut_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_view, "DRAIN_DEADLINE_S", 0.01)
    engine, _ = await started(VirtualClock(0.0), HungLLM)
    watch = EngineWatch(engine, model=MODEL, clock=engine.now, interval_s=3600.0)
    await watch.start()
    await watch.stop(read_again=True)
    section = watch.section([Phase([], 0.0, 1.0)], cold_start=True)
    assert section["available"] is False
    assert "took over 0.01 s to drain" in section["error"]
    assert (section["scrapes"], section["failures"]) == (1, 1)
