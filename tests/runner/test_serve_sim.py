"""The OpenAI-compatible server over the simulated engine: a real aiohttp server on 127.0.0.1
and a real HTTP client, plus the ``rackscope serve-sim`` command in a subprocess."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from rackscope.clock import WallClock
from rackscope.runner.engines.sim import SimEngine
from rackscope.runner.serve_sim import TOKEN_TEXTS, SimServer
from rackscope.simgpu import SimGpu, profile

MODEL = "llama2-70b"


class Served:
    def __init__(self, engine: SimEngine, url: str, session: aiohttp.ClientSession) -> None:
        self.engine = engine
        self.url = url
        self.session = session

    async def post(self, path: str, body: object) -> tuple[int, Any]:
        async with self.session.post(self.url + path, json=body) as resp:
            return resp.status, await resp.json(content_type=None)

    async def sse(self, path: str, body: dict[str, Any]) -> tuple[list[Any], list[float]]:
        """Every ``data:`` payload (JSON decoded, or the string ``[DONE]``) and when it came."""
        payloads: list[Any] = []
        times: list[float] = []
        async with self.session.post(self.url + path, json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            async for line in resp.content:
                text = line.decode()
                if text == "\n":
                    continue
                assert text.startswith("data: ") and text.endswith("\n")
                data = text[len("data: "):-1]
                payloads.append(data if data == "[DONE]" else json.loads(data))
                times.append(time.monotonic())
        return payloads, times


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    clock = WallClock()
    engine = SimEngine([SimGpu(0, profile("gb300"), clock)], clock, MODEL)
    await engine.start()
    runner = SimServer(engine).runner()
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    async with aiohttp.ClientSession() as session:
        yield Served(engine, f"http://{host}:{port}", session)
    await engine.stop()
    await runner.cleanup()


def words(n: int) -> list[str]:
    return [TOKEN_TEXTS[i % len(TOKEN_TEXTS)] for i in range(n)]


async def test_completion(served: Served) -> None:
    status, body = await served.post("/v1/completions", {"model": MODEL, "prompt": "x" * 30, "max_tokens": 7})
    assert status == 200
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": "".join(words(7)), "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15}


async def test_completion_with_token_ids_and_default_length(served: Served) -> None:
    status, body = await served.post("/v1/completions", {"model": MODEL, "prompt": list(range(50))})
    assert status == 200
    assert body["usage"] == {"prompt_tokens": 50, "completion_tokens": 16, "total_tokens": 66}
    status, body = await served.post("/v1/completions", {"model": MODEL, "prompt": [[1, 2, 3]], "max_tokens": 1,
                                                         "ignore_eos": True, "min_tokens": 1, "temperature": 0.0})
    assert status == 200
    assert body["usage"]["prompt_tokens"] == 3


async def test_chat_completion(served: Served) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    body_in = {"model": MODEL, "messages": messages, "max_tokens": 3, "max_completion_tokens": 5}
    status, body = await served.post("/v1/chat/completions", body_in)
    assert status == 200
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "".join(words(5))}
    assert choice["finish_reason"] == "length"
    # Two messages of 4 template tokens, 2 + 1 text tokens, 3 for the reply header.
    assert body["usage"] == {"prompt_tokens": 14, "completion_tokens": 5, "total_tokens": 19}


async def test_streamed_completion_one_chunk_per_token_with_usage(served: Served) -> None:
    n = 40
    payloads, times = await served.sse("/v1/completions", {
        "model": MODEL, "prompt": "hello", "max_tokens": n, "stream": True, "stream_options": {"include_usage": True},
    })
    assert payloads[-1] == "[DONE]"
    usage_chunk = payloads[-2]
    tokens = payloads[:-2]
    assert len(tokens) == n
    rid = tokens[0]["id"]
    for i, chunk in enumerate(tokens):
        assert set(chunk) == {"id", "object", "created", "model", "choices", "usage"}
        assert (chunk["id"], chunk["object"], chunk["model"], chunk["usage"]) == (rid, "text_completion", MODEL, None)
        assert chunk["choices"] == [{
            "index": 0, "text": words(n)[i], "logprobs": None, "finish_reason": "length" if i == n - 1 else None,
        }]
    assert usage_chunk["choices"] == []
    assert usage_chunk["id"] == rid
    assert usage_chunk["usage"] == {"prompt_tokens": 2, "completion_tokens": n, "total_tokens": n + 2}
    # Tokens arrive one iteration apart, not all at once.
    step_s = served.engine.deployment(0).step_s(1, 0)
    assert times[n - 1] - times[0] > 0.5 * (n - 1) * step_s


async def test_streamed_chat(served: Served) -> None:
    n = 6
    payloads, _ = await served.sse("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": n, "stream": True,
    })
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert len(chunks) == n + 1  # one per token, then the finish
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert "usage" not in chunk
        assert chunk["system_fingerprint"] is None
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": words(n)[0]}
    assert deltas[1:n] == [{"content": w} for w in words(n)[1:]]
    assert deltas[n] == {}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * n + ["length"]


async def test_many_concurrent_streams(served: Served) -> None:
    async def one(i: int) -> int:
        payloads, _ = await served.sse("/v1/completions", {"model": MODEL, "prompt": "p" * i, "max_tokens": 20 + i,
                                                           "stream": True})
        assert payloads[-1] == "[DONE]"
        return sum(len(p["choices"]) for p in payloads[:-1])

    counts = await asyncio.gather(*(one(i) for i in range(40)))
    assert counts == [20 + i for i in range(40)]
    assert served.engine.stats().gpus[0].requests_done == 40


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [
    ("/v1/completions", {"prompt": "a"}, 400, "model", None),
    ("/v1/completions", {"model": 7, "prompt": "a"}, 400, "model", None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": 123}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": -3}, 400, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "5"}, 400, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": True}, 400, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 4096}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "a" * 20_000}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}}, 400,
     "stream_options", None),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "n": 2}, 400, "n", None),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 3, "min_tokens": 4}, 400, "min_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "ignore_eos": "no"}, 400, "ignore_eos", None),
    ("/v1/completions", [1, 2], 400, None, None),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, 400, "messages", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens", None),
    ("/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model",
     "model_not_found"),
])
async def test_bad_requests(served: Served, path: str, body: object, status: int, param: str | None,
                            code: str | None) -> None:
    got, answer = await served.post(path, body)
    assert got == status
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert served.engine.stats().queued == 0


async def test_invalid_json(served: Served) -> None:
    async with served.session.post(served.url + "/v1/completions", data=b"{not json") as resp:
        assert resp.status == 400
        assert "JSON" in (await resp.json())["error"]["message"]


async def test_models_and_health(served: Served) -> None:
    async with served.session.get(served.url + "/v1/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in body["data"]] == [(MODEL, "model", 4096)]
    assert "simulated" in body["data"][0]["owned_by"]
    async with served.session.get(served.url + "/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["simulated"] is True


async def test_metrics(served: Served) -> None:
    for n in (3, 5):
        status, _ = await served.post("/v1/completions", {"model": MODEL, "prompt": "x" * 40, "max_tokens": n})
        assert status == 200
    async with served.session.get(served.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    gpu = (("gpu", "0"), ("model", MODEL))
    assert samples[("rackscope_sim_generation_tokens_total", gpu)] == 8
    assert samples[("rackscope_sim_prompt_tokens_total", gpu)] == 20
    assert samples[("rackscope_sim_requests_finished_total", (*gpu, ("outcome", "ok")))] == 2
    assert samples[("rackscope_sim_requests_running", gpu)] == 0
    assert samples[("rackscope_sim_requests_waiting", (("model", MODEL),))] == 0
    assert samples[("rackscope_sim_kv_cache_usage_ratio", gpu)] == 0
    info = (("gpu_model", "NVIDIA GB300"), ("model", MODEL), ("simulated", "true"))
    assert samples[("rackscope_sim_info", info)] == 1


async def test_metrics_in_vllm_format(served: Served) -> None:
    """The engine's state under vLLM's names, read by the agent's vLLM reader."""
    from rackscope.engine_metrics import EngineFormat, ModelReading, read_page

    for n in (3, 5):
        status, _ = await served.post("/v1/completions", {"model": MODEL, "prompt": "x" * 40, "max_tokens": n})
        assert status == 200
    async with served.session.get(served.url + "/metrics") as resp:
        reading = read_page(await resp.read(), content_type=resp.headers["Content-Type"])
    assert reading.format is EngineFormat.VLLM
    (idle,) = reading.models
    assert dataclasses.replace(idle, ttft_s=None, itl_s=None) == ModelReading(
        MODEL, running=0.0, waiting=0.0, kv_cache_usage=0.0, input_tokens=20.0, output_tokens=8.0)
    assert idle.ttft_s is not None and idle.itl_s is not None
    assert (idle.ttft_s.count, idle.itl_s.count) == (2, 2 + 4)
    body = {"model": MODEL, "prompt": "x" * 4000, "max_tokens": 400}
    tasks = [asyncio.create_task(served.post("/v1/completions", body)) for _ in range(10)]
    try:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if served.engine.stats().gpus[0].running == 10:
                break
        async with served.session.get(served.url + "/metrics") as resp:
            (busy,) = read_page(await resp.read()).models
        stats = served.engine.stats().gpus[0]
        assert busy.running == 10
        assert 0 < busy.kv_cache_usage <= stats.kv_used_tokens / stats.kv_capacity_tokens  # type: ignore[operator]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_metrics_carry_vllm_latency_histograms_timed_as_the_server_sees_them(served: Served) -> None:
    from rackscope.engine_metrics import read_page
    from rackscope.runner.serve_sim import VLLM_ITL_BUCKETS_S, VLLM_TTFT_BUCKETS_S

    streamed, whole = 30, 9
    payloads, _ = await served.sse("/v1/completions", {"model": MODEL, "prompt": "x" * 400, "max_tokens": streamed,
                                                       "stream": True})
    assert payloads[-1] == "[DONE]"
    status, _ = await served.post("/v1/completions", {"model": MODEL, "prompt": "x" * 400, "max_tokens": whole})
    assert status == 200
    async with served.session.get(served.url + "/metrics") as resp:
        text = await resp.text()
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text
    assert 'vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="llama2-70b"}' in text
    (m,) = read_page(text.encode()).models
    assert m.ttft_s is not None and m.itl_s is not None
    assert m.ttft_s.bounds == (*VLLM_TTFT_BUCKETS_S, math.inf)
    assert m.itl_s.bounds == (*VLLM_ITL_BUCKETS_S, math.inf)
    assert m.ttft_s.count == 2  # one first token per request
    assert m.itl_s.count == (streamed - 1) + (whole - 1)  # one gap per later token, streamed or not
    # One decode step per token on an otherwise idle GPU: the gaps are the step time (the wall
    # clock may add a little on a busy machine, never take any away).
    step_s = served.engine.deployment(0).step_s(1, 0)
    assert 0.9 * step_s <= m.itl_s.sum / m.itl_s.count <= 3 * step_s
    assert m.ttft_s.sum >= 2 * 0.9 * step_s  # a prefill step at least, for each


async def test_kv_usage_shows_while_requests_run(served: Served) -> None:
    body = {"model": MODEL, "prompt": "x" * 4000, "max_tokens": 400}
    tasks = [asyncio.create_task(served.post("/v1/completions", body)) for _ in range(10)]
    for _ in range(200):
        await asyncio.sleep(0.01)
        if served.engine.stats().gpus[0].running == 10:
            break
    async with served.session.get(served.url + "/metrics") as resp:
        text = await resp.text()
    usage = re.search(r'^rackscope_sim_kv_cache_usage_bytes\{gpu="0",model="llama2-70b"\} (\S+)$', text, re.M)
    running = re.search(r'^rackscope_sim_requests_running\{gpu="0",model="llama2-70b"\} (\S+)$', text, re.M)
    assert usage and running
    assert float(running.group(1)) == 10
    assert float(usage.group(1)) >= 10 * 1000 * 163_840
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_client_leaving_withdraws_the_request(served: Served) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3000, "stream": True}
    async with served.session.post(served.url + "/v1/completions", json=body) as resp:
        await resp.content.readline()
        assert served.engine.stats().running == 1
    # Closing the connection made the server's next write fail; the job is cancelled.
    for _ in range(200):
        if served.engine.stats().running == 0:
            break
        await asyncio.sleep(0.01)
    assert served.engine.stats().running == 0
    assert served.engine.stats().gpus[0].kv_used_tokens == 0


async def test_gpu_dropping_mid_stream_ends_it_with_an_error(served: Served) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3000, "stream": True}
    payloads: list[Any] = []
    async with served.session.post(served.url + "/v1/completions", json=body) as resp:
        async for line in resp.content:
            if not line.strip():
                continue
            data = line.decode()[len("data: "):].strip()
            payloads.append(data if data == "[DONE]" else json.loads(data))
            if len(payloads) == 3:
                served.engine.gpus[0].set_faults(dropped=True)
    assert payloads[-1] == "[DONE]"
    error = payloads[-2]["error"]
    assert error["code"] == "engine"
    assert "fell off the bus" in error["message"]
    assert 3 <= len(payloads) - 2 < 3000
    async with served.session.get(served.url + "/health") as resp:
        assert resp.status == 503
    status, answer = await served.post("/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 503
    assert answer["error"]["type"] == "server_error"


@pytest.mark.slow
def test_serve_sim_command_serves_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rackscope", "serve-sim", "--gpu-model", "gb300", "--gpus", "2", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        url = match.group(0)

        async def use() -> None:
            async with aiohttp.ClientSession() as session:
                async with session.get(url + "/health") as resp:
                    assert resp.status == 200
                body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": True}
                async with session.post(url + "/v1/completions", json=body) as resp:
                    text = await resp.text()
                assert text.count("data: ") == 5
                assert text.endswith("data: [DONE]\n\n")

        asyncio.run(use())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


def test_serve_sim_command_rejects_bad_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rackscope", "serve-sim", "--gpus", "0"], capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--gpus" in result.stderr
