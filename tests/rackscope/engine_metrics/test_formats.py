"""Each server format read from real public pages: detection and the mapped values exactly as on
the page; then broken pages, which are errors and never numbers."""

from __future__ import annotations

import math

import pytest

from rackscope.engine_metrics.formats import UNKNOWN_MODEL, EngineFormat, ModelReading, read_page
from rackscope.errors import PeerError
from tests.rackscope.engine_metrics.pages import (
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


# --- TTFT and ITL histograms ------------------------------------------------------------------------
# No recorded page here carries whole histograms (the v0 page stops inside one), so these pages are
# built in the test from the series names, labels and buckets the servers' sources declare (vLLM v1:
# vllm/v1/metrics/loggers.py; SGLang: sglang/srt/metrics/collector.py), and say so.
VLLM_TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


def histogram_lines(
    family: str, labels: str, bounds: tuple[float, ...], counts: list[float], total: float
) -> list[str]:
    """A histogram as a Prometheus client writes it: cumulative buckets, +Inf, count, sum."""
    out = [f"# TYPE {family} histogram"]
    for bound, count in zip((*bounds, math.inf), counts, strict=True):
        le = "+Inf" if math.isinf(bound) else repr(bound)
        out.append(f'{family}_bucket{{{labels},le="{le}"}} {count}')
    out += [f"{family}_count{{{labels}}} {counts[-1]}", f"{family}_sum{{{labels}}} {total}"]
    return out


def cumulative(per_bucket: list[float]) -> list[float]:
    out, running = [], 0.0
    for c in per_bucket:
        running += c
        out.append(running)
    return out


def test_vllm_histograms_are_read_and_replicas_summed() -> None:
    ttft = [0.0] * 7 + [3.0, 5.0, 2.0] + [0.0] * 12 + [1.0]  # 22 bounds + the +Inf bucket
    itl_bounds = (0.01, 0.025, 0.05, 0.075, 0.1)
    lines = ["# TYPE vllm:num_requests_running gauge",
             'vllm:num_requests_running{engine="0",model_name="m"} 4.0',
             'vllm:num_requests_running{engine="1",model_name="m"} 2.0']
    for engine in ("0", "1"):
        labels = f'engine="{engine}",model_name="m"'
        lines += histogram_lines("vllm:time_to_first_token_seconds", labels, VLLM_TTFT_BOUNDS, cumulative(ttft), 2.5)
        lines += histogram_lines("vllm:inter_token_latency_seconds", labels, itl_bounds,
                                 cumulative([10.0, 20.0, 5.0, 0.0, 0.0, 1.0]), 0.9)
        # The deprecated v0 name beside it is not read when the v1 one is there.
        lines += histogram_lines("vllm:time_per_output_token_seconds", labels, itl_bounds, [0.0] * 5 + [9.0], 99.0)
    (m,) = read_page(("\n".join(lines) + "\n").encode()).models
    assert m.running == 6.0
    assert m.ttft_s is not None and m.itl_s is not None
    assert m.ttft_s.bounds == (*VLLM_TTFT_BOUNDS, math.inf)
    assert m.ttft_s.counts == tuple(2 * c for c in cumulative(ttft))
    assert (m.ttft_s.count, m.ttft_s.sum) == (22.0, 5.0)
    assert m.itl_s.bounds == (*itl_bounds, math.inf)
    assert m.itl_s.counts == (20.0, 60.0, 70.0, 70.0, 70.0, 72.0)
    assert (m.itl_s.count, m.itl_s.sum) == (72.0, 1.8)


@pytest.mark.parametrize(("fmt", "families", "read"), [
    # vLLM v0 has no inter_token_latency: its time_per_output_token is the ITL.
    ("vllm", ("vllm:time_per_output_token_seconds",), "vllm:time_per_output_token_seconds"),
    ("sglang", ("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
     "sglang:inter_token_latency_seconds"),
    ("sglang", ("sglang:time_per_output_token_seconds",), "sglang:time_per_output_token_seconds"),
])
def test_itl_falls_back_to_time_per_output_token(fmt: str, families: tuple[str, ...], read: str) -> None:
    labels = 'model_name="m"'
    lines = []
    for i, family in enumerate(families):
        lines += histogram_lines(family, labels, (0.05, 0.1), [float(i + 1), float(i + 2), float(i + 3)], 0.25)
    reading = read_page(("\n".join(lines) + "\n").encode())
    assert reading.format is EngineFormat(fmt)
    (m,) = reading.models
    assert m.itl_s is not None
    i = families.index(read)
    assert m.itl_s.counts == (float(i + 1), float(i + 2), float(i + 3))


def broken_histogram(change: str) -> bytes:
    lines = histogram_lines("vllm:time_to_first_token_seconds", 'model_name="m"', (0.1, 0.5), [1.0, 3.0, 4.0], 1.5)
    text = "\n".join(lines) + "\n"
    if change == "le-not-a-number":
        text = text.replace('le="0.5"', 'le="half"')
    elif change == "le-nan":
        text = text.replace('le="0.5"', 'le="NaN"')
    elif change == "bucket-twice":
        text = text.replace('le="0.5"', 'le="0.50"').replace('le="0.1"', 'le="0.5"')
    elif change == "not-cumulative":
        text = text.replace('le="0.5"} 3.0', 'le="0.5"} 0.5')
    elif change == "inf-unlike-count":
        text = text.replace('_count{model_name="m"} 4.0', '_count{model_name="m"} 5.0')
    elif change == "negative-sum":
        text = text.replace("_sum{model_name=\"m\"} 1.5", "_sum{model_name=\"m\"} -1.5")
    elif change == "infinite-bucket-count":
        text = text.replace('le="0.1"} 1.0', 'le="0.1"} +Inf')
    elif change == "too-many-buckets":
        extra = "".join(f'vllm:time_to_first_token_seconds_bucket{{model_name="m",le="{1000 + i}"}} 4.0\n'
                        for i in range(300))
        text = text.replace("vllm:time_to_first_token_seconds_count", extra + "vllm:time_to_first_token_seconds_count")
    return text.encode()


@pytest.mark.parametrize(("change", "error"), [
    ("le-not-a-number", "no number|not Prometheus text"), ("le-nan", "no upper bound|not Prometheus text"),
    ("bucket-twice", "twice|not Prometheus text"), ("not-cumulative", "not cumulative"),
    ("inf-unlike-count", "unlike its count"), ("negative-sum", "no sum of latencies"),
    ("infinite-bucket-count", "not cumulative"), ("too-many-buckets", "more than 256 buckets"),
])
def test_broken_histograms_are_errors_not_latencies(change: str, error: str) -> None:
    assert read_page(broken_histogram("none")).models[0].ttft_s is not None  # the page unbroken reads
    with pytest.raises(PeerError, match=error):
        read_page(broken_histogram(change))


def test_histogram_cut_short_or_of_unlike_replicas_is_left_out_not_guessed() -> None:
    whole = histogram_lines("vllm:time_to_first_token_seconds", 'engine="0",model_name="m"', (0.1, 0.5),
                            [1.0, 3.0, 4.0], 1.5)
    no_sum = [line for line in whole if "_sum" not in line]
    assert read_page(("\n".join(no_sum) + "\n").encode()).models == ()
    other = histogram_lines("vllm:time_to_first_token_seconds", 'engine="1",model_name="m"', (0.2, 0.5),
                            [1.0, 3.0, 4.0], 1.5)[1:]
    running = 'vllm:num_requests_running{engine="0",model_name="m"} 1.0'
    (m,) = read_page(("\n".join([running, *whole, *other]) + "\n").encode()).models
    assert (m.running, m.ttft_s) == (1.0, None)
