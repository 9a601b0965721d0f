"""The hf engine, for real: a tiny randomly initialised Llama generating real tokens on the CPU.

Nothing is downloaded: the model is built from a ``LlamaConfig`` in the test and the
tokenizer from a word-level ``tokenizers`` vocabulary, both also saved to a temporary
directory to exercise the load-from-path route.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rackscope.errors import EngineError, EngineUnavailable
from rackscope.runner.engines.base import Done, Engine, EngineEvent, Failed, FirstToken, Request, Tokens
from rackscope.runner.engines.hf import HfEngine, is_available

# PyTorch models built and run on the CPU: seconds each (`pytest -m "not slow"` leaves them out).
pytestmark = pytest.mark.slow

# Read by huggingface_hub when it is first imported (below, through transformers).
os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "cat", "sat", "on", "mat"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
MAX_POSITIONS = 64
BATCH_WAIT_S = 0.3  # a full batch does not wait, so this only bounds a partial one


def build_tokenizer() -> Any:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    model = tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_model(vocab_size: int) -> Any:
    torch.manual_seed(1234)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


@pytest.fixture
def model(tokenizer: Any) -> Any:
    return build_model(len(tokenizer))


async def collect(stream: AsyncIterator[EngineEvent]) -> list[EngineEvent]:
    return [event async for event in stream]


async def timed(engine: HfEngine, request: Request) -> tuple[float, list[EngineEvent]]:
    start = engine.now()
    return start, await collect(engine.stream(request))


def token_count(events: list[EngineEvent]) -> int:
    return sum(e.count for e in events if isinstance(e, FirstToken | Tokens))


@pytest.mark.slow
def test_the_engine_satisfies_the_engine_protocol(model: Any, tokenizer: Any) -> None:
    assert is_available() is True  # torch and transformers are here, or this module was skipped
    engine = HfEngine(model, tokenizer, model_name="tiny-llama")
    assert isinstance(engine, Engine)
    assert engine.model == "tiny-llama"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"batch_wait_s": -1.0}, "batch_wait_s"),
        ({"dtype": "int3"}, "dtype"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_settings_are_rejected(model: Any, kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        HfEngine(model, **kwargs)


async def test_concurrent_requests_get_exact_counts_and_ttft_before_e2e(model: Any, tokenizer: Any) -> None:
    # A generous batch window: all four arrive well within it, so they form one batch.
    engine = HfEngine(model, tokenizer, max_batch=4, batch_wait_s=BATCH_WAIT_S)
    await engine.start()
    try:
        lengths = [5, 9, 13, 2]
        results = await asyncio.gather(
            *(
                timed(engine, Request(f"r{i}", input_ids=[1, 4 + i, 5, 6], max_output_tokens=n))
                for i, n in enumerate(lengths)
            )
        )
    finally:
        await engine.stop()
    for (start, events), n in zip(results, lengths, strict=True):
        assert isinstance(events[0], FirstToken)
        assert events[0].count == 1
        done = events[-1]
        assert isinstance(done, Done)
        assert done.output_tokens == n
        assert done.input_tokens == 4
        assert done.gpu is None
        assert token_count(events) == n
        assert all(isinstance(e, Tokens) for e in events[1:-1])
        ttft_s, e2e_s = events[0].t - start, done.t - start
        assert 0 < ttft_s < e2e_s
        assert [e.t for e in events] == sorted(e.t for e in events)
    # All four were prefilled in one forward pass: their first tokens share one timestamp.
    assert len({events[0].t for _, events in results}) == 1


@pytest.mark.slow
async def test_more_requests_than_the_batch_all_complete_in_successive_batches(model: Any) -> None:
    engine = HfEngine(model, max_batch=2, batch_wait_s=BATCH_WAIT_S)
    await engine.start()
    try:
        results = await asyncio.gather(
            *(collect(engine.stream(Request(f"r{i}", input_ids=[1, 5, 6 + i], max_output_tokens=3))) for i in range(5))
        )
    finally:
        await engine.stop()
    assert [r[-1].output_tokens for r in results if isinstance(r[-1], Done)] == [3] * 5
    first_token_times = sorted({r[0].t for r in results})
    # Batches of two, two and one: three distinct prefill steps.
    assert len(first_token_times) == 3


async def test_text_prompts_are_tokenized_and_counted(model: Any, tokenizer: Any) -> None:
    engine = HfEngine(model, tokenizer)
    await engine.start()
    try:
        events = await collect(engine.stream(Request("t", prompt="the quick brown fox", max_output_tokens=6)))
    finally:
        await engine.stop()
    done = events[-1]
    assert isinstance(done, Done)
    assert done.input_tokens == len(tokenizer("the quick brown fox")["input_ids"]) == 4
    assert done.output_tokens == 6


async def test_eos_stops_a_request_only_when_it_does_not_ignore_eos(model: Any) -> None:
    # Greedy decoding is deterministic: make the token this prompt starts with the EOS.
    prompt = [1, 7, 8, 9]
    with torch.inference_mode():
        model.generation_config.eos_token_id = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    engine = HfEngine(model)
    await engine.start()
    try:
        stopped = await collect(engine.stream(Request("eos", input_ids=prompt, max_output_tokens=8, ignore_eos=False)))
        ignored = await collect(engine.stream(Request("noeos", input_ids=prompt, max_output_tokens=8, ignore_eos=True)))
    finally:
        await engine.stop()
    assert isinstance(stopped[-1], Done)
    assert stopped[-1].output_tokens == 1
    assert isinstance(ignored[-1], Done)
    assert ignored[-1].output_tokens == 8


async def test_a_model_saved_to_a_directory_loads_by_path(model: Any, tokenizer: Any, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "tiny-llama")
    tokenizer.save_pretrained(tmp_path / "tiny-llama")
    engine = HfEngine(str(tmp_path / "tiny-llama"), dtype="float32")
    await engine.start()
    try:
        events = await collect(engine.stream(Request("p", prompt="a cat sat on the mat", max_output_tokens=4)))
    finally:
        await engine.stop()
    assert engine.model == str(tmp_path / "tiny-llama")
    done = events[-1]
    assert isinstance(done, Done)
    assert (done.input_tokens, done.output_tokens) == (6, 4)


async def test_a_bad_model_path_is_unavailable_with_a_clear_message(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    engine = HfEngine(missing)
    with pytest.raises(EngineUnavailable, match=f"cannot load model '{missing}' with transformers"):
        await engine.start()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
async def test_cuda_without_a_gpu_is_unavailable(model: Any) -> None:
    with pytest.raises(EngineUnavailable, match="no CUDA GPU"):
        await HfEngine(model, device="cuda").start()


async def test_requests_that_cannot_run_fail_without_stopping_the_others(model: Any) -> None:
    engine = HfEngine(model, max_batch=4)
    await engine.start()
    try:
        too_long, no_tokenizer, fine = await asyncio.gather(
            collect(engine.stream(Request("long", input_ids=[1] * 60, max_output_tokens=10))),
            collect(engine.stream(Request("text", prompt="the fox", max_output_tokens=3))),
            collect(engine.stream(Request("ok", input_ids=[1, 5], max_output_tokens=3))),
        )
    finally:
        await engine.stop()
    assert isinstance(too_long[-1], Failed)
    assert "exceed the model's 64 positions" in too_long[-1].message
    assert isinstance(no_tokenizer[-1], Failed)
    assert "no tokenizer" in no_tokenizer[-1].message
    assert isinstance(fine[-1], Done)
    assert fine[-1].output_tokens == 3


async def test_a_caller_that_walks_away_leaves_the_batch_and_the_rest_finish(model: Any) -> None:
    engine = HfEngine(model, max_batch=2)
    await engine.start()
    try:
        leaver = engine.stream(Request("leaver", input_ids=[1, 5, 6], max_output_tokens=40))
        stayer = asyncio.create_task(collect(engine.stream(Request("stayer", input_ids=[1, 7], max_output_tokens=12))))
        assert isinstance(await anext(leaver), FirstToken)
        await leaver.aclose()
        events = await stayer
        # The engine is still serving after the row was dropped.
        after = await collect(engine.stream(Request("after", input_ids=[1, 8], max_output_tokens=2)))
    finally:
        await engine.stop()
    assert isinstance(events[-1], Done)
    assert events[-1].output_tokens == 12
    assert isinstance(after[-1], Done)
    assert after[-1].output_tokens == 2


async def test_stream_before_start_is_an_engine_error(model: Any) -> None:
    with pytest.raises(EngineError, match="not started"):
        await collect(HfEngine(model).stream(Request("x", input_ids=[1], max_output_tokens=1)))


async def test_a_run_counts_generated_tokens_before_each_request_ends(model: Any, tokenizer: Any) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from rackscope import contract
    from rackscope.runner.config import RunConfig
    from rackscope.runner.runloop import run_scenario

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    def counted() -> int:
        data = reader.get_metrics_data()
        if data is None:
            return 0
        return sum(
            int(p.value)
            for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            if m.name == contract.TOKENS.otel_name
            for p in m.data.data_points if p.attributes["gen_ai.token.type"] == "output"
        )

    engine = HfEngine(model, tokenizer, max_batch=1, batch_wait_s=0.0)
    await engine.start()
    cfg = RunConfig.from_dict({"engine": "hf", "model": "m", "node": "n01", "scenario": "concurrency",
                               "concurrency": 1,
                               "requests": 2, "output_len": 40, "input_len": 8, "warmup_auto": False})
    try:
        run = asyncio.create_task(run_scenario(engine, cfg, meter=provider.get_meter("t")))
        seen = []
        while not run.done():
            seen.append(counted())
            await asyncio.sleep(0.001)
        result = await run
    finally:
        await engine.stop()
    provider.shutdown()
    assert result.summary["requests_completed"] == 2
    assert counted() == 80
    # Every token counted as it came: values strictly between whole requests were seen.
    assert any(0 < v < 40 for v in seen)
    assert any(40 < v < 80 for v in seen)
    assert seen == sorted(seen)
