"""The openai engine against a real streaming server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from rackscope.errors import EngineUnavailable
from rackscope.runner.engines.base import Done, Engine, EngineEvent, Failed, FirstToken, Request, Tokens
from rackscope.runner.engines.openai import OpenAIEngine


def _load_server_module() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "streaming_server.py"
    spec = importlib.util.spec_from_file_location("streaming_server", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("streaming_server", module)
    spec.loader.exec_module(module)
    return module


srv = _load_server_module()


@pytest.fixture
def server() -> Iterator[srv.StreamingServer]:
    with srv.StreamingServer() as s:
        yield s


def req(n: int = 5, rid: str = "r1", **x_test: object) -> Request:
    return Request(request_id=rid, prompt="hello", max_output_tokens=n, extra={"x_test": x_test} if x_test else {})


async def events_of(engine: OpenAIEngine, request: Request) -> list[EngineEvent]:
    return [ev async for ev in engine.stream(request)]


async def started(base_url: str, **kw: object) -> OpenAIEngine:
    engine = OpenAIEngine(base_url, "test-model", **kw)  # type: ignore[arg-type]
    await engine.start()
    return engine


async def test_completions_stream_events_and_usage(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url)
    assert isinstance(engine, Engine)
    evs = await events_of(engine, req(5))
    assert isinstance(evs[0], FirstToken)
    assert all(isinstance(e, Tokens) for e in evs[1:-1])
    done = evs[-1]
    assert isinstance(done, Done)
    assert (done.output_tokens, done.input_tokens, done.output_tokens_method) == (5, 7, "usage")
    assert sum(e.count for e in evs if isinstance(e, FirstToken | Tokens)) == 5
    times = [e.t for e in evs]
    assert times == sorted(times)
    await engine.stop()


async def test_request_body_and_headers(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url + "/v1", api_key="sk-test")
    await events_of(engine, Request(request_id="abc-1", input_ids=[1, 2, 3], max_output_tokens=4, input_tokens=3))
    got = server.requests[-1]
    assert (got.method, got.path) == ("POST", "/v1/completions")
    assert got.headers["authorization"] == "Bearer sk-test"
    assert got.headers["x-request-id"] == "abc-1"
    assert got.body["prompt"] == [1, 2, 3]
    assert got.body["model"] == "test-model"
    assert got.body["max_tokens"] == 4
    assert got.body["stream"] is True
    assert got.body["stream_options"] == {"include_usage": True}
    assert got.body["ignore_eos"] is True
    assert got.body["min_tokens"] == 4
    await engine.stop()


async def test_no_api_key_no_auth_header_and_no_ignore_eos(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url)
    r = Request(request_id="r", prompt="x", max_output_tokens=3, ignore_eos=False, extra={"temperature": 0.5})
    await events_of(engine, r)
    got = server.requests[-1]
    assert "authorization" not in got.headers
    assert "ignore_eos" not in got.body
    assert "min_tokens" not in got.body
    assert got.body["temperature"] == 0.5
    await engine.stop()


async def test_chat_counts_content_not_role_chunk(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url, api="chat")
    rec = await engine.record(req(6, usage=False))
    assert rec.ok
    assert (rec.output_tokens, rec.output_tokens_method) == (6, "counted")
    got = server.requests[-1]
    assert got.path == "/v1/chat/completions"
    assert got.body["messages"] == [{"role": "user", "content": "hello"}]
    assert got.body["max_completion_tokens"] == 6
    chat_events = await events_of(engine, req(4))
    assert isinstance(chat_events[-1], Done)
    assert chat_events[-1].output_tokens == 4
    await engine.stop()


async def test_chat_counts_reasoning_tokens(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url, api="chat")
    for wire in ({}, {"spaced": True}, {"events_per_write": 3}):
        rec = await engine.record(req(8, reasoning=5, usage=False, **wire))
        assert rec.ok, wire
        assert (rec.output_tokens, rec.output_tokens_method) == (8, "counted"), wire
        assert rec.itl_s is not None
        assert len(rec.itl_s) == 7
    await engine.stop()


async def test_chat_needs_a_text_prompt(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url, api="chat")
    evs = await events_of(engine, Request(request_id="r", input_ids=[1, 2]))
    assert len(evs) == 1
    assert isinstance(evs[0], Failed)
    assert evs[0].error_type == "engine"
    await engine.stop()


async def test_usage_versus_counted(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url)
    with_usage = await engine.record(req(9))
    without = await engine.record(req(9, usage=False))
    assert (with_usage.output_tokens, with_usage.output_tokens_method, with_usage.input_tokens) == (9, "usage", 7)
    assert (without.output_tokens, without.output_tokens_method) == (9, "counted")
    await engine.stop()


@pytest.mark.parametrize(
    "wire",
    [
        {"framing": "length"},
        {"framing": "close"},
        {"crlf": True},
        {"spaced": True},
        {"spaced": True, "crlf": True, "split": True},
        {"split": True},
        {"events_per_write": 4},
        {"events_per_write": 3, "usage": False},
        {"chunks_per_write": 4},
        {"chunks_per_write": 3, "usage": False},
        {"usage_null": True},
        {"usage_null": True, "usage": False, "chunks_per_write": 2},
        {"comments": True},
        {"comments": True, "crlf": True, "split": True},
    ],
    ids=lambda w: ",".join(f"{k}={v}" for k, v in w.items()),
)
@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_wire_variants_count_the_same(server: srv.StreamingServer, wire: dict[str, object], api: str) -> None:
    engine = await started(server.base_url, api=api)
    for rid in ("a", "b"):  # the second runs on a reused connection where framing allows
        rec = await engine.record(req(11, rid=rid, **wire))
        assert rec.ok, rec.error
        assert rec.output_tokens == 11
        assert rec.output_tokens_method == ("counted" if wire.get("usage") is False else "usage")
        assert rec.first_token_s is not None
        assert rec.end_s is not None
        assert rec.itl_s is not None
        assert len(rec.itl_s) == 10
    await engine.stop()


async def test_record_timings_follow_the_server(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url)
    rec = await engine.record(req(6, ttft_s=0.05, itl_s=0.02))
    assert rec.ok
    assert rec.ttft_s is not None
    assert 0.045 < rec.ttft_s < 0.5
    assert rec.itl_s is not None
    assert len(rec.itl_s) == 5
    # Five 20 ms gaps; a loaded machine may bunch two, so judge the total and the median.
    assert 0.07 < sum(rec.itl_s) < 0.5
    assert 0.015 < sorted(rec.itl_s)[2] < 0.15
    assert rec.e2e_s is not None
    assert rec.e2e_s >= rec.ttft_s + sum(rec.itl_s) - 1e-9
    assert rec.tpot_s is not None
    assert rec.tpot_s == pytest.approx(sum(rec.itl_s) / 5, rel=0.05)
    await engine.stop()


@pytest.mark.parametrize(("status", "kind"), [(400, "http_4xx"), (429, "http_4xx"), (500, "http_5xx")])
async def test_http_errors_carry_the_reason(server: srv.StreamingServer, status: int, kind: str) -> None:
    engine = await started(server.base_url)
    evs = await events_of(engine, req(3, status=status))
    assert len(evs) == 1
    assert isinstance(evs[0], Failed)
    assert evs[0].error_type == kind
    assert f"HTTP {status}" in evs[0].message
    assert f"test failure {status}" in evs[0].message
    assert engine.error_counts[kind] == 1
    # The error body was read to its end, so the same connection serves the next request.
    ok = await engine.record(req(3))
    assert ok.ok
    assert server.connections == 1
    await engine.stop()


async def test_server_closing_mid_stream_is_a_protocol_failure(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url)
    evs = await events_of(engine, req(10, fail_after=3, failure="close"))
    failed = evs[-1]
    assert isinstance(failed, Failed)
    assert failed.error_type == "protocol"
    assert failed.output_tokens == 3
    assert sum(e.count for e in evs if isinstance(e, FirstToken | Tokens)) == 3
    rec = await engine.record(req(10, fail_after=0, failure="close"))
    assert not rec.ok
    assert rec.error_type == "protocol"
    assert engine.error_counts["protocol"] == 2
    assert (await engine.record(req(2))).ok  # a fresh connection replaces the dropped one
    await engine.stop()


async def test_server_error_event_fails_the_stream(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url)
    rec = await engine.record(req(10, fail_after=4, failure="error_event"))
    assert not rec.ok
    assert rec.error_type == "protocol"
    assert rec.error is not None
    assert "engine died" in rec.error
    assert rec.output_tokens == 4
    await engine.stop()


async def test_error_event_in_the_same_read_as_content(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url)
    rec = await engine.record(req(10, fail_after=4, failure="error_event", events_per_write=8))
    assert not rec.ok
    assert rec.error is not None
    assert "engine died" in rec.error
    await engine.stop()


async def test_connect_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    engine = OpenAIEngine(f"http://127.0.0.1:{port}", "m", connect_timeout_s=2)
    with pytest.raises(EngineUnavailable, match="cannot reach") as info:
        await engine.start()
    assert "hint" in str(info.value)
    rec = await engine.record(req(3))
    assert not rec.ok
    assert rec.error_type == "connect"
    evs = await events_of(engine, req(3))
    assert isinstance(evs[0], Failed)
    assert evs[0].error_type == "connect"
    assert engine.error_counts["connect"] == 2


async def test_silent_server_times_out(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url, timeout_s=0.3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    rec = await engine.record(req(10, fail_after=2, failure="stall"))
    assert not rec.ok
    assert rec.error_type == "timeout"
    assert rec.output_tokens == 2
    assert 0.3 <= loop.time() - t0 < 2.0
    await engine.stop()


async def test_model_check_at_start(server: srv.StreamingServer) -> None:
    wrong = OpenAIEngine(server.base_url, "other-model")
    with pytest.raises(EngineUnavailable, match="not served") as info:
        await wrong.start()
    assert "test-model" in str(info.value)
    auto = OpenAIEngine(server.base_url, "")
    await auto.start()
    assert auto.model == "test-model"
    assert auto.served_models == ["test-model"]
    await auto.stop()


async def test_start_against_a_non_openai_server() -> None:
    with srv.StreamingServer(srv.Behaviour(models=[])) as s:
        engine = OpenAIEngine(s.base_url, "")
        with pytest.raises(EngineUnavailable, match="serves no model"):
            await engine.start()


async def test_many_concurrent_streams_share_a_keep_alive_pool(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url)
    assert await engine.prewarm(200) == 200
    for _ in range(200):  # the server thread accepts them a little after the client connected
        if server.connections >= 200:
            break
        await asyncio.sleep(0.01)
    connections = server.connections
    assert connections == 200
    for _wave in range(2):
        recs = await asyncio.gather(*(engine.record(req(20, rid=f"r{i}", itl_s=0.002)) for i in range(200)))
        assert all(r.ok for r in recs)
        assert [r.output_tokens for r in recs] == [20] * 200
        assert {r.request_id for r in recs} == {f"r{i}" for i in range(200)}
    assert server.connections == connections  # every request reused a warm connection
    await engine.stop()


async def test_stale_keep_alive_connection_is_replaced(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url)
    for i in range(3):
        rec = await engine.record(req(3, rid=f"s{i}", close_after=True))
        assert rec.ok, rec.error
        await asyncio.sleep(0.05)
    assert engine.error_counts.total() == 0
    await engine.stop()


async def test_consumer_leaving_early_and_stop_cancelling(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url)
    stream = engine.stream(req(50, itl_s=0.01))
    async for ev in stream:
        assert isinstance(ev, FirstToken)
        break
    await stream.aclose()
    assert (await engine.record(req(3))).ok
    task = asyncio.create_task(events_of(engine, req(50, itl_s=0.02)))
    await asyncio.sleep(0.1)
    await engine.stop()
    evs = await task
    assert isinstance(evs[-1], Failed)
    assert evs[-1].error_type == "cancelled"


async def test_record_task_cancellation_propagates(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url)
    task = asyncio.create_task(engine.record(req(50, itl_s=0.02)))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await engine.record(req(2))).ok
    await engine.stop()


async def test_plain_json_answer_to_a_stream_request(server: srv.StreamingServer) -> None:
    engine = await started(server.base_url)
    rec = await engine.record(req(8, json_body=True))
    assert rec.ok
    assert rec.output_tokens == 8
    assert rec.output_tokens_method == "usage"
    await engine.stop()


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="api"):
        OpenAIEngine("http://127.0.0.1:1", "m", api="embeddings")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="URL"):
        OpenAIEngine("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="line breaks"):
        OpenAIEngine("http://127.0.0.1:1", "m", api_key="a\r\nX-Evil: 1")
    with pytest.raises(ValueError, match="deadline"):
        OpenAIEngine("http://127.0.0.1:1", "m", request_deadline_s=0)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_https_with_a_private_ca(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    with srv.StreamingServer(ssl_context=server_ctx) as s:
        assert s.base_url.startswith("https://")
        engine = await started(s.base_url, ssl_context=client_ctx)
        rec = await engine.record(req(12))
        assert rec.ok
        assert rec.output_tokens == 12
        untrusting = OpenAIEngine(s.base_url, "test-model")
        with pytest.raises(EngineUnavailable):
            await untrusting.start()
        await engine.stop()
