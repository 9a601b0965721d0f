"""The agent client against real HTTP servers on 127.0.0.1: good answers taken, others refused.

Answers of the agent's shape are taken; every other answer (wrong status, type, shape, size or
speed) is refused, by kind."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from rackscope.rack.client import AgentClient, AgentHung, AgentUnreachable, BadAnswer, Refusal, printable
from rackscope.rack.spec import AnswerCaps

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RUN = "r1"


def _view(**change: Any) -> dict[str, Any]:
    now = time.time()
    view = {
        "run_id": RUN, "status": "running", "continuous": False, "start_at": now, "config": {"engine": "sim"},
        "created_at": now, "started_at": now, "ended_at": None, "summary": None, "record_path": None, "error": None,
    }  # fmt: skip
    return {**view, **change}


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[str, str, Handler], Awaitable[AgentClient]]]:
    """Serve one route on 127.0.0.1 and return a client of it (1 s calls, small caps)."""
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(method: str, path: str, handler: Handler) -> AgentClient:
        app = web.Application()
        app.router.add_route(method, path, handler)
        app.router.add_get("/elsewhere", lambda _: web.json_response(_view()))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        session = aiohttp.ClientSession()
        sessions.append(session)
        caps = AnswerCaps(answer_bytes=64 * 1024, record_bytes=64 * 1024, requests_bytes=1000, log_bytes=1000)
        return AgentClient(session, f"http://127.0.0.1:{port}", token="t0k", call_timeout_s=1.0,
                           collect_timeout_s=1.0, caps=caps)

    yield start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


async def test_an_answer_of_the_agents_shape_is_taken(serve: Any) -> None:
    async def view(request: web.Request) -> web.StreamResponse:
        assert request.headers["Authorization"] == "Bearer t0k"
        return web.json_response(_view(summary={"complete": True, "output_tokens_per_s": 5, "gpus": 2}))

    client = await serve("GET", f"/v1/runs/{RUN}", view)
    got = await client.view(RUN)
    assert got["summary"]["output_tokens_per_s"] == 5


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (web.json_response(_view(), status=500), "HTTP 500 instead of 200"),
        (web.Response(text="<html>oops</html>", content_type="text/html"), "text/html, not JSON"),
        (web.Response(body=b"{not json", content_type="application/json"), "not JSON"),
        (web.json_response([_view()]), "a JSON array, expected an object"),
        (web.json_response(_view(status="exploded")), "status: Input should be"),
        (web.json_response(_view(started_at="yesterday")), "started_at"),
        (web.json_response(_view(summary={"complete": 1})), "summary.complete"),
        (web.json_response(_view(summary={"complete": True, "energy_j": -5.0})), "summary.energy_j"),
        (web.json_response(_view(run_id="someone-else")), "about run 'someone-else'"),
        (web.json_response({"detail": "no run"}, status=404), "no longer knows the run"),
        (web.json_response(_view(padding="x" * 100_000)), "more than"),
        (web.Response(status=302, headers={"Location": "/elsewhere"}), "HTTP 302"),
    ],
)
async def test_answers_the_agent_never_gives_are_refused(serve: Any, answer: web.Response, message: str) -> None:
    async def view(_: web.Request) -> web.StreamResponse:
        return answer

    client = await serve("GET", f"/v1/runs/{RUN}", view)
    with pytest.raises(BadAnswer, match=message) as caught:
        await client.view(RUN)
    assert str(caught.value).startswith(f"GET /v1/runs/{RUN}")


async def test_a_compressed_answer_is_capped_after_decompression(serve: Any) -> None:
    bomb = gzip.compress(b"[" + b"0," * 5_000_000 + b"0]")  # 10 MB of JSON in about 10 kB

    async def view(_: web.Request) -> web.StreamResponse:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    client = await serve("GET", f"/v1/runs/{RUN}", view)
    assert len(bomb) < client.caps.answer_bytes
    with pytest.raises(BadAnswer, match="more than 65536 bytes"):
        await client.view(RUN)


@pytest.mark.slow
async def test_a_trickle_is_bounded_by_the_whole_call_deadline(serve: Any) -> None:
    async def view(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(100):  # a byte every 0.1 s: each read is quick, the whole never ends
            await response.write(b" ")
            await asyncio.sleep(0.1)
        return response

    client = await serve("GET", f"/v1/runs/{RUN}", view)
    started = time.monotonic()
    with pytest.raises(AgentHung, match=f"GET /v1/runs/{RUN} did not answer within 1 s"):
        await client.view(RUN)
    assert time.monotonic() - started < 3.0


async def test_a_gateway_error_counts_as_no_answer_and_a_refusal_is_returned(serve: Any) -> None:
    async def view(_: web.Request) -> web.StreamResponse:
        return web.Response(status=503, text="upstream down")

    client = await serve("GET", f"/v1/runs/{RUN}", view)
    with pytest.raises(AgentUnreachable, match="HTTP 503 from a gateway"):
        await client.view(RUN)

    async def start(_: web.Request) -> web.StreamResponse:
        return web.json_response({"detail": "run r0 is running; cancel it or wait\x1b[2J"}, status=409)

    client = await serve("POST", "/v1/runs", start)
    refusal = await client.start({"engine": "sim"}, RUN)
    assert refusal == Refusal(409, "run r0 is running; cancel it or wait?[2J")


async def test_rows_over_their_cap_or_off_their_digest_are_not_kept(serve: Any, tmp_path: Path) -> None:
    from rackscope.runner.results.record import RowsDigest

    rows = b'{"request_id": "a", "ok": true}\n' * 10

    async def requests(_: web.Request) -> web.StreamResponse:
        return web.Response(body=rows, content_type="application/x-ndjson")

    client = await serve("GET", f"/v1/runs/{RUN}/requests", requests)
    target = tmp_path / "rows.jsonl"
    assert await client.requests(RUN, target, None) == len(rows)
    assert target.read_bytes() == rows
    other = tmp_path / "other.jsonl"
    with pytest.raises(BadAnswer, match="do not match the record"):
        await client.requests(RUN, other, RowsDigest(10, len(rows), "0" * 64))
    assert not other.exists()
    small = AgentClient(client.session, client.base_url, token=None, call_timeout_s=1.0, collect_timeout_s=1.0,
                        caps=AnswerCaps(requests_bytes=100))
    with pytest.raises(BadAnswer, match="more than 100 bytes"):
        await small.requests(RUN, other, None)
    assert not other.exists()
    assert not list(tmp_path.glob(".*.tmp.*"))


def test_printable_strips_terminal_control() -> None:
    assert printable("ok\x1b[31m red\nline") == "ok?[31m red line"
    assert printable("x" * 400) == "x" * 300 + "..."
