"""The TensorRT-LLM engine: the missing-package error for real, and the translation of the LLM
API's streaming output objects into rackscope events.

TensorRT-LLM cannot run on these machines (no GPU, no CUDA wheel), so the translation tests
hand the engine a stand-in for the ``tensorrt_llm`` module. That stand-in is the vendor
boundary: it reproduces the documented LLM API shapes (``LLM(**kwargs)``,
``generate_async(inputs, sampling_params=..., streaming=True)`` returning a ``RequestOutput``
that is its own async iterator with cumulative ``outputs[0].token_ids``, ``finished``,
``prompt_token_ids`` and ``abort()``; ``get_stats`` / ``get_stats_async``), and nothing of
rackscope's own code is replaced.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from rackscope.clock import VirtualClock
from rackscope.errors import EngineError, EngineUnavailable
from rackscope.runner.engines.base import Done, Engine, EngineEvent, Failed, FirstToken, Request, Tokens
from rackscope.runner.engines.trtllm import INSTALL_HINT, TrtllmEngine, is_available, summarize_iteration_stats

STEP_S = 0.25  # exact in binary, so event times compare exactly
EOS_AFTER = 5  # the stand-in model "emits EOS" after this many tokens unless ignore_eos


# ---------------------------------------------------------------- vendor boundary stand-in


@dataclass
class SamplingParams:
    max_tokens: int = 32
    ignore_eos: bool = False


@dataclass
class KvCacheConfig:
    free_gpu_memory_fraction: float | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)


class RequestOutput:
    """Like the LLM API's RequestOutput: one object, updated in place on every step."""

    def __init__(self, llm: StandInLLM, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.llm = llm
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput(0)]
        self.finished = False
        self.aborted = False
        limit = params.max_tokens if params.ignore_eos else min(params.max_tokens, EOS_AFTER)
        # Chunks of tokens per step: the first step brings one token, later ones several,
        # as a runtime with speculative decoding or coalesced responses does.
        self._steps: list[int] = []
        remaining = limit
        for size in [1, *llm.chunk_sizes]:
            if remaining <= 0:
                break
            self._steps.append(min(size, remaining))
            remaining -= self._steps[-1]
        while remaining > 0:
            self._steps.append(min(llm.chunk_sizes[-1], remaining))
            remaining -= self._steps[-1]

    def __aiter__(self) -> RequestOutput:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        if self.llm.fail_after_steps is not None and self.llm.steps_done >= self.llm.fail_after_steps:
            raise RuntimeError("Encountered an error in forward function: CUDA out of memory")
        if not self._steps:
            if self.llm.end_without_finish:
                raise StopAsyncIteration
            self.finished = True
            return self
        self.llm.clock.advance(STEP_S)
        size = self._steps.pop(0)
        start = len(self.outputs[0].token_ids)
        self.outputs[0].token_ids.extend(range(1000 + start, 1000 + start + size))
        self.llm.steps_done += 1
        if not self._steps and not self.llm.end_without_finish:
            self.finished = True
        return self

    def abort(self) -> None:
        self.aborted = True


class StandInLLM:
    def __init__(self, clock: VirtualClock, **kwargs: Any) -> None:
        self.clock = clock
        self.kwargs = kwargs
        self.chunk_sizes = [3]
        self.fail_after_steps: int | None = None
        self.end_without_finish = False
        self.steps_done = 0
        self.calls: list[tuple[Any, SamplingParams, bool]] = []
        self.results: list[RequestOutput] = []
        self.stats_records: list[Any] = []
        self.shut_down = False

    def generate_async(self, inputs: Any, sampling_params: SamplingParams, streaming: bool = False) -> RequestOutput:
        self.calls.append((inputs, sampling_params, streaming))
        prompt_ids = list(inputs) if isinstance(inputs, list) else [len(word) for word in inputs.split()]
        result = RequestOutput(self, prompt_ids, sampling_params)
        self.results.append(result)
        return result

    def get_stats(self, timeout: float) -> list[Any]:
        records, self.stats_records = self.stats_records, []
        return records

    def shutdown(self) -> None:
        self.shut_down = True


class IterationResult:
    def __init__(self, records: list[Any]) -> None:
        self._records = list(records)

    def __aiter__(self) -> IterationResult:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if not self._records:
            raise StopAsyncIteration
        return dict(self._records.pop(0))


class StandInLLMWithAsyncStats(StandInLLM):
    def get_stats_async(self, timeout: float) -> IterationResult:
        records, self.stats_records = self.stats_records, []
        return IterationResult(records)


def stand_in_module(clock: VirtualClock, llm_class: type[StandInLLM] = StandInLLM) -> SimpleNamespace:
    built: list[StandInLLM] = []

    def make_llm(**kwargs: Any) -> StandInLLM:
        llm = llm_class(clock, **kwargs)
        built.append(llm)
        return llm

    return SimpleNamespace(
        LLM=make_llm, SamplingParams=SamplingParams, llmapi=SimpleNamespace(KvCacheConfig=KvCacheConfig), built=built
    )


# ---------------------------------------------------------------- helpers


async def collect(stream: AsyncIterator[EngineEvent]) -> list[EngineEvent]:
    return [event async for event in stream]


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(100.0)


async def started_engine(clock: VirtualClock, **kwargs: Any) -> tuple[TrtllmEngine, StandInLLM]:
    module = stand_in_module(clock, kwargs.pop("llm_class", StandInLLM))
    engine = TrtllmEngine("meta-llama/Llama-3.1-8B-Instruct", module=module, clock=clock, **kwargs)
    await engine.start()
    return engine, module.built[0]


# ---------------------------------------------------------------- the real missing package


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm is installed here")
async def test_start_without_tensorrt_llm_raises_unavailable_with_the_hint() -> None:
    assert is_available() is False
    engine = TrtllmEngine("meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(EngineUnavailable) as caught:
        await engine.start()
    message = str(caught.value)
    assert INSTALL_HINT in message
    assert "rackscope[trtllm]" in message
    assert "NGC" in message
    assert "docs/real-nodes.md" in message
    assert isinstance(caught.value.__cause__, ImportError)


def test_the_engine_satisfies_the_engine_protocol() -> None:
    assert isinstance(TrtllmEngine("m"), Engine)


@pytest.mark.parametrize(("kwargs", "needle"), [({"tp": 0}, "tp"), ({"kv_cache_fraction": 1.5}, "kv_cache_fraction")])
def test_bad_settings_are_rejected(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        TrtllmEngine("m", **kwargs)


# ---------------------------------------------------------------- building the LLM


async def test_start_builds_the_llm_with_tp_backend_kv_cache_and_extra_arguments(clock: VirtualClock) -> None:
    engine, llm = await started_engine(clock, tp=4, kv_cache_fraction=0.85, max_batch_size=512)
    assert llm.kwargs["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert llm.kwargs["tensor_parallel_size"] == 4
    assert llm.kwargs["backend"] == "pytorch"
    assert llm.kwargs["enable_iter_perf_stats"] is True
    assert llm.kwargs["kv_cache_config"] == KvCacheConfig(free_gpu_memory_fraction=0.85)
    assert llm.kwargs["max_batch_size"] == 512
    await engine.stop()
    assert llm.shut_down is True


async def test_a_module_without_kv_cache_config_gets_the_plain_dict(clock: VirtualClock) -> None:
    module = stand_in_module(clock)
    del module.llmapi
    engine = TrtllmEngine("m", kv_cache_fraction=0.5, module=module, clock=clock)
    assert engine.llm_arguments(module)["kv_cache_config"] == {"free_gpu_memory_fraction": 0.5}


async def test_a_failing_model_load_is_unavailable_with_the_cause(clock: VirtualClock) -> None:
    def broken_llm(**kwargs: Any) -> StandInLLM:
        raise OSError("model path /models/missing does not exist")

    module = SimpleNamespace(LLM=broken_llm, SamplingParams=SamplingParams)
    engine = TrtllmEngine("/models/missing", module=module, clock=clock)
    with pytest.raises(EngineUnavailable, match="could not load model '/models/missing'"):
        await engine.start()


async def test_stream_before_start_is_an_engine_error(clock: VirtualClock) -> None:
    engine = TrtllmEngine("m", module=stand_in_module(clock), clock=clock)
    with pytest.raises(EngineError, match="not started"):
        await collect(engine.stream(Request("r0", prompt="hello")))


# ---------------------------------------------------------------- output objects -> events


async def test_a_prompt_streams_first_token_then_the_deltas_then_done_with_exact_counts(clock: VirtualClock) -> None:
    engine, llm = await started_engine(clock)
    events = await collect(engine.stream(Request("r0", prompt="the quick brown fox", max_output_tokens=10)))

    inputs, params, streaming = llm.calls[0]
    assert inputs == "the quick brown fox"
    assert params == SamplingParams(max_tokens=10, ignore_eos=True)
    assert streaming is True
    # 10 tokens arrive as 1, 3, 3, 3: the first step's delta, then the cumulative differences.
    assert events == [
        FirstToken(100.25, 1),
        Tokens(100.5, 3),
        Tokens(100.75, 3),
        Tokens(101.0, 3),
        Done(101.0, input_tokens=4, output_tokens=10, output_tokens_method="engine"),
    ]
    assert llm.results[0].aborted is False


async def test_token_id_prompts_are_passed_as_a_list_and_counted(clock: VirtualClock) -> None:
    engine, llm = await started_engine(clock)
    events = await collect(engine.stream(Request("r1", input_ids=[1, 2, 3, 4, 5, 6], max_output_tokens=4)))
    assert llm.calls[0][0] == [1, 2, 3, 4, 5, 6]
    done = events[-1]
    assert isinstance(done, Done)
    assert (done.input_tokens, done.output_tokens) == (6, 4)
    assert sum(e.count for e in events if isinstance(e, FirstToken | Tokens)) == 4


async def test_without_ignore_eos_the_count_is_what_the_runtime_generated(clock: VirtualClock) -> None:
    engine, llm = await started_engine(clock)
    events = await collect(engine.stream(Request("r2", prompt="hi", max_output_tokens=50, ignore_eos=False)))
    assert llm.calls[0][1] == SamplingParams(max_tokens=50, ignore_eos=False)
    done = events[-1]
    assert isinstance(done, Done)
    assert done.output_tokens == EOS_AFTER


async def test_a_runtime_error_mid_stream_becomes_failed_with_the_tokens_so_far(clock: VirtualClock) -> None:
    engine, llm = await started_engine(clock)
    llm.fail_after_steps = 2
    events = await collect(engine.stream(Request("r3", prompt="hi", max_output_tokens=10)))
    assert events[:2] == [FirstToken(100.25, 1), Tokens(100.5, 3)]
    failed = events[-1]
    assert isinstance(failed, Failed)
    assert failed.error_type == "engine"
    assert "CUDA out of memory" in failed.message
    assert failed.output_tokens == 4
    assert llm.results[0].aborted is True


async def test_a_stream_that_ends_unfinished_is_a_protocol_failure(clock: VirtualClock) -> None:
    engine, llm = await started_engine(clock)
    llm.end_without_finish = True
    events = await collect(engine.stream(Request("r4", prompt="hi", max_output_tokens=4)))
    failed = events[-1]
    assert isinstance(failed, Failed)
    assert failed.error_type == "protocol"
    assert failed.output_tokens == 4


async def test_a_request_without_prompt_or_ids_fails_without_reaching_the_runtime(clock: VirtualClock) -> None:
    engine, llm = await started_engine(clock)
    events = await collect(engine.stream(Request("r5")))
    assert len(events) == 1
    assert isinstance(events[0], Failed)
    assert events[0].error_type == "engine"
    assert llm.calls == []


async def test_a_caller_that_walks_away_aborts_the_request(clock: VirtualClock) -> None:
    engine, llm = await started_engine(clock)
    stream = engine.stream(Request("r6", prompt="hi", max_output_tokens=100))
    first = await anext(stream)
    assert first == FirstToken(100.25, 1)
    await stream.aclose()
    assert llm.results[0].aborted is True


async def test_concurrent_requests_each_get_their_own_counts(clock: VirtualClock) -> None:
    engine, _ = await started_engine(clock)
    results = await asyncio.gather(
        *(collect(engine.stream(Request(f"c{i}", prompt="a b", max_output_tokens=5 + i))) for i in range(4))
    )
    assert [r[-1].output_tokens for r in results if isinstance(r[-1], Done)] == [5, 6, 7, 8]


# ---------------------------------------------------------------- iteration statistics

# Two iteration records in the documented shape (trtllm-serve's /metrics shows the same).
ITERATIONS = [
    {
        "gpuMemUsage": 76665782272,
        "iter": 153,
        "iterLatencyMS": 6.0,
        "numActiveRequests": 3,
        "numQueuedRequests": 0,
        "kvCacheStats": {"maxNumBlocks": 101256, "freeNumBlocks": 101250, "usedNumBlocks": 6, "tokensPerBlock": 32},
        "inflightBatchingStats": {
            "numScheduledRequests": 3,
            "numContextRequests": 1,
            "numGenRequests": 2,
            "numPausedRequests": 0,
            "numCtxTokens": 512,
        },
    },
    {
        "gpuMemUsage": 76665782272,
        "iter": 154,
        "iterLatencyMS": 8.0,
        "numActiveRequests": 4,
        "numQueuedRequests": 2,
        "kvCacheStats": {
            "allocNewBlocks": 3126,
            "allocTotalBlocks": 3126,
            "cacheHitRate": 0.00128,
            "freeNumBlocks": 101253,
            "maxNumBlocks": 101256,
            "missedBlocks": 3121,
            "reusedBlocks": 4,
            "tokensPerBlock": 32,
            "usedNumBlocks": 3,
        },
        "inflightBatchingStats": {
            "numScheduledRequests": 5,
            "numContextRequests": 0,
            "numGenRequests": 5,
            "numPausedRequests": 0,
            "numCtxTokens": 0,
        },
    },
]

EXPECTED_SUMMARY = {
    "iterations": 2,
    "iter_latency_s_mean": pytest.approx(0.007),
    "active_requests": 4,
    "queued_requests": 2,
    "gpu_memory_used_bytes": 76665782272,
    "kv_cache": {
        "blocks_max": 101256,
        "blocks_free": 101253,
        "blocks_used": 3,
        "tokens_per_block": 32,
        "usage_ratio": pytest.approx(3 / 101256),
        "hit_rate": pytest.approx(0.00128),
        "blocks_reused": 4,
        "blocks_missed": 3121,
    },
    "inflight_batching": {
        "scheduled_requests": 5,
        "scheduled_requests_mean": pytest.approx(4.0),
        "context_requests": 0,
        "generation_requests": 5,
        "paused_requests": 0,
        "context_tokens": 0,
    },
}


async def test_stats_reads_get_stats_async_when_the_llm_has_it(clock: VirtualClock) -> None:
    engine, llm = await started_engine(clock, llm_class=StandInLLMWithAsyncStats)
    llm.stats_records = list(ITERATIONS)
    assert await engine.iteration_stats(timeout_s=0.5) == EXPECTED_SUMMARY
    # Stats are drained: a second call sees none.
    empty = await engine.iteration_stats()
    assert empty["iterations"] == 0
    assert empty["kv_cache"] is None
    assert empty["active_requests"] is None


async def test_stats_falls_back_to_get_stats_and_accepts_json_strings(clock: VirtualClock) -> None:
    engine, llm = await started_engine(clock)
    llm.stats_records = [json.dumps(record) for record in ITERATIONS]
    assert await engine.iteration_stats() == EXPECTED_SUMMARY


def test_records_without_kv_or_batching_stats_give_none_sections() -> None:
    summary = summarize_iteration_stats([{"iter": 1, "iterLatencyMS": 2.5, "numActiveRequests": 1}])
    assert summary["kv_cache"] is None
    assert summary["inflight_batching"] is None
    assert summary["iter_latency_s_mean"] == pytest.approx(0.0025)
    assert summary["queued_requests"] is None


def test_stats_that_are_not_json_are_an_engine_error() -> None:
    with pytest.raises(EngineError, match="not JSON"):
        summarize_iteration_stats(["{not json"])


# ---------------------------------------------------------------- through the run loop: live token counts


class GatedOutput(RequestOutput):
    """A step happens only when the test releases it, so the run can be looked at in between."""

    async def __anext__(self) -> RequestOutput:
        llm = self.llm
        assert isinstance(llm, GatedLLM)
        await llm.gate.acquire()
        return await super().__anext__()


class GatedLLM(StandInLLM):
    def __init__(self, clock: VirtualClock, **kwargs: Any) -> None:
        super().__init__(clock, **kwargs)
        self.gate = asyncio.Semaphore(0)

    def generate_async(self, inputs: Any, sampling_params: SamplingParams, streaming: bool = False) -> RequestOutput:
        self.calls.append((inputs, sampling_params, streaming))
        result = GatedOutput(self, [len(word) for word in str(inputs).split()], sampling_params)
        self.results.append(result)
        return result


async def test_a_run_counts_streamed_tokens_before_the_request_ends(clock: VirtualClock) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from rackscope import contract
    from rackscope.runner.config import RunConfig
    from rackscope.runner.runloop import run_scenario

    engine, llm = await started_engine(clock, llm_class=GatedLLM)
    assert isinstance(llm, GatedLLM)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    def counted() -> int:
        data = reader.get_metrics_data()
        assert data is not None
        return sum(
            int(p.value)
            for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            if m.name == contract.TOKENS.otel_name
            for p in m.data.data_points if p.attributes["gen_ai.token.type"] == "output"
        )

    cfg = RunConfig.from_dict({"engine": "trtllm", "model": "m", "node": "n01", "scenario": "concurrency",
                               "concurrency": 1,
                               "requests": 1, "output_len": 10, "input_len": 4, "warmup_auto": False})
    run = asyncio.create_task(run_scenario(engine, cfg, meter=provider.get_meter("t")))
    seen = []
    for _ in range(4):  # the stand-in's steps bring 1, 3, 3 and 3 tokens
        llm.gate.release()
        for _ in range(20):  # let the step's output reach the run loop
            await asyncio.sleep(0)
        seen.append(counted())
    result = await run
    provider.shutdown()
    assert seen == [1, 4, 7, 10]  # each step's tokens counted as they streamed, not at the end
    assert result.summary["requests_completed"] == 1
