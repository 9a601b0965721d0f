"""Each server format read from real public pages: detection and the mapped values exactly as on
the page; then broken pages, which are errors and never numbers."""

from __future__ import annotations

import math

import pytest

from rackscope.agent.engine_metrics.formats import UNKNOWN_MODEL, EngineFormat, ModelReading, read_page
from rackscope.errors import PeerError
from tests.agent.engine_metrics.pages import (
    SGLANG,
    SGLANG_DISAGG,
    SGLANG_EARLY,
    SGLANG_EARLY_TOKENS,
    TRTLLM_EMPTY,
    TRTLLM_STAT,
    TRTLLM_UNPREFIXED,
    VLLM_V0,
    VLLM_V1,
    VLLM_V1_EARLY,
    page,
)

SGLANG_LLAMA32 = "/shared/public/elr-models/meta-llama/Llama-3.2-3B/5cc0ffe09ee49f7be6ca7c794ee6bd7245e84e60/"


@pytest.mark.parametrize(
    ("name", "fmt", "expected"),
    [
        # v0: token counters; its CPU-cache gauge is not the KV cache, the TTFT histogram is cut short.
        (VLLM_V0, EngineFormat.VLLM,
         ModelReading("bigscience/bloom-560m", input_tokens=1196.0, output_tokens=218152.0)),
        (VLLM_V1_EARLY, EngineFormat.VLLM,
         ModelReading("Qwen/Qwen2.5-Coder-32B-Instruct", running=0.0, waiting=0.0, kv_cache_usage=0.0)),
        # 0.10: kv_cache_usage_perc beside *_created timestamps that are no counts.
        (VLLM_V1, EngineFormat.VLLM, ModelReading("zai-org/GLM-4.5", kv_cache_usage=9.75010481363281e-06)),
        (SGLANG_EARLY, EngineFormat.SGLANG,
         ModelReading("google/gemma-2-9b-it", running=0.0, waiting=0.0, kv_cache_usage=0.0)),
        (SGLANG_EARLY_TOKENS, EngineFormat.SGLANG, ModelReading(SGLANG_LLAMA32, input_tokens=230794.0)),
        (SGLANG, EngineFormat.SGLANG,
         ModelReading("/shared/public/models/Meta-Llama-3-8B-Instruct", running=0.0, kv_cache_usage=0.0)),
        # cached_tokens_total (2688) counts cached prompt tokens: a part, not the input tokens.
        (SGLANG_DISAGG, EngineFormat.SGLANG,
         ModelReading("/home/moyun.zty/models/deepseek-ai__DeepSeek-R1", running=0.0, kv_cache_usage=0.0)),
        # used 3 of 22955 blocks; the JSON names no model, so the caller's is used.
        (TRTLLM_STAT, EngineFormat.TRTLLM,
         ModelReading("llama2-70b", running=1.0, waiting=0.0, kv_cache_usage=3 / 22955)),
    ],
)
def test_real_pages_detected_and_mapped(name: str, fmt: EngineFormat, expected: ModelReading) -> None:
    reading = read_page(page(name), model="llama2-70b")
    assert reading.format is fmt
    assert reading.models == (expected,)
    # Forcing the right format gives the same reading.
    assert read_page(page(name), fmt=fmt, model="llama2-70b") == reading


def test_detection_needs_nothing_but_the_page() -> None:
    assert read_page(page(VLLM_V1)).format is EngineFormat.VLLM
    assert read_page(page(TRTLLM_STAT), content_type="application/json").models[0].model == UNKNOWN_MODEL


def test_trtllm_empty_list_is_no_iteration_not_zero() -> None:
    reading = read_page(page(TRTLLM_EMPTY))
    assert reading.format is EngineFormat.TRTLLM
    assert reading.models == ()


def test_trtllm_takes_the_latest_iteration_of_the_list() -> None:
    # The list holds every iteration since the last read; the latest is what the server holds now.
    stat = (page(TRTLLM_STAT)[1:-1]).decode()
    older = stat.replace('"iter":60', '"iter":59').replace('"numQueuedRequests":0', '"numQueuedRequests":5')
    reading = read_page(f"[{older},{stat}]".encode())
    assert reading.models[0].waiting == 0.0
    reading = read_page(f"[{stat},{older}]".encode())
    assert reading.models[0].waiting == 0.0


def test_a_page_of_no_known_format_is_an_error() -> None:
    # trtllm-serve's unprefixed Prometheus page (2026) carries none of the contract's series.
    with pytest.raises(PeerError, match="none of vllm, sglang, trtllm"):
        read_page(page(TRTLLM_UNPREFIXED))
    with pytest.raises(PeerError, match="none of"):
        read_page(page(TRTLLM_UNPREFIXED), fmt=EngineFormat.TRTLLM)


@pytest.mark.parametrize(("name", "wrong"), [(VLLM_V1, EngineFormat.SGLANG), (SGLANG, EngineFormat.VLLM),
                                             (TRTLLM_STAT, EngineFormat.VLLM)])
def test_a_page_of_another_format_than_forced_is_an_error(name: str, wrong: EngineFormat) -> None:
    with pytest.raises(PeerError, match="not the"):
        read_page(page(name), fmt=wrong)


def test_trtllm_prometheus_names() -> None:
    # No public post shows this page (SOURCES.md): it is built here from the series names and
    # labels TensorRT-LLM's tensorrt_llm/metrics/collector.py declares, not recorded.
    labels = 'engine_type="undefined",model_name="Qwen3-8B"'
    constructed = "\n".join([
        "# TYPE trtllm_num_requests_running gauge", f"trtllm_num_requests_running{{{labels}}} 3.0",
        "# TYPE trtllm_num_requests_waiting gauge", f"trtllm_num_requests_waiting{{{labels}}} 7.0",
        "# TYPE trtllm_kv_cache_utilization gauge", f"trtllm_kv_cache_utilization{{{labels}}} 0.25",
        "# TYPE trtllm_prompt_tokens counter", f"trtllm_prompt_tokens_total{{{labels}}} 1000.0",
        "# TYPE trtllm_generation_tokens counter", f"trtllm_generation_tokens_total{{{labels}}} 500.0",
        "",
    ]).encode()
    reading = read_page(constructed)
    assert reading.format is EngineFormat.TRTLLM
    assert reading.models == (ModelReading("Qwen3-8B", 3.0, 7.0, 0.25, 1000.0, 500.0),)


def test_replicas_are_summed_and_their_kv_usage_averaged() -> None:
    # Two data-parallel engines of one model, as vLLM labels them: the real v1 page with a second
    # engine added beside the first.
    one = page(VLLM_V1_EARLY).decode()
    two = one.replace('{model_name="Qwen', '{engine="1",model_name="Qwen').replace("} 0.0", "} 0.5")
    lines = one.splitlines() + [line for line in two.splitlines() if 'engine="1"' in line]
    reading = read_page("\n".join(lines).encode() + b"\n")
    assert reading.models == (
        ModelReading("Qwen/Qwen2.5-Coder-32B-Instruct", running=0.5, waiting=0.5, kv_cache_usage=0.25),
    )


def test_histograms_are_read_whole_or_not_at_all() -> None:
    # The recorded v0 page stops inside its TTFT histogram: no +Inf bucket, no count.
    assert read_page(page(VLLM_V0)).models[0].ttft_s is None
    whole = page(VLLM_V0).decode() + "\n".join([
        'vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="bigscience/bloom-560m"} 213.0',
        'vllm:time_to_first_token_seconds_count{model_name="bigscience/bloom-560m"} 213.0',
        'vllm:time_to_first_token_seconds_sum{model_name="bigscience/bloom-560m"} 6.5',
        "",
    ])
    ttft = read_page(whole.encode()).models[0].ttft_s
    assert ttft is not None
    assert ttft.bounds == (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, math.inf)
    assert ttft.counts == (0.0, 0.0, 0.0, 112.0, 211.0, 211.0, 213.0, 213.0)
    assert (ttft.sum, ttft.count) == (6.5, 213.0)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (page(VLLM_V1_EARLY).replace(b"gpu_cache_usage_perc{model_name=\"Qwen/Qwen2.5-Coder-32B-Instruct\"} 0.0",
                                     b"gpu_cache_usage_perc{model_name=\"Qwen/Qwen2.5-Coder-32B-Instruct\"} 1.5"),
         "not a fraction"),
        (page(VLLM_V1_EARLY).replace(b"num_requests_waiting{model_name=\"Qwen/Qwen2.5-Coder-32B-Instruct\"} 0.0",
                                     b"num_requests_waiting{model_name=\"Qwen/Qwen2.5-Coder-32B-Instruct\"} NaN"),
         "no count can be"),
        (page(VLLM_V0).replace(b"} 1196.0", b"} -1196.0"), "no count can be"),
        (page(VLLM_V1_EARLY) + page(VLLM_V1_EARLY).splitlines(keepends=True)[14], "twice"),
        (page(VLLM_V1_EARLY) + page(SGLANG), "which is it"),
        (b"vllm:num_requests_running{model_name=\"m\" 1\n", "not Prometheus text"),
        (b"<html><body>502 Bad Gateway</body></html>\n", "not Prometheus text|none of"),
        (b"\xff\xfe" + page(VLLM_V1), "not UTF-8"),
        (b"[{\"numActiveRequests\": 1}]", "numeric 'iter'"),
        (b'[{"iter": 1, "numActiveRequests": "1"}]', "not a number"),
        (b'[{"iter": 1, "kvCacheStats": {"usedNumBlocks": 9, "maxNumBlocks": 4}}]', "not a fraction"),
        (b'{"iter": 1}', "not a list"),
        (b"[" * 100_000, "does not parse"),
    ],
    ids=["kv-above-1", "nan-count", "negative-counter", "duplicate-series", "two-formats", "bad-text", "html",
         "not-utf8", "json-no-iter", "json-string-count", "json-kv-above-1", "json-object", "json-deep"],
)
def test_broken_pages_are_errors_not_counts(body: bytes, error: str) -> None:
    with pytest.raises(PeerError, match=error):
        read_page(body)
