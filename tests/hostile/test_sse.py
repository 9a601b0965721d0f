"""The openai engine against a server that streams broken, endless or giant SSE responses.

A wrong token count is worse than none: whatever cannot be parsed fails the request with
``protocol`` and counts nothing, an endless response ends at the request deadline, and a
line that never ends is refused once it passes the engine's cap, without reading the rest.
A healthy request running beside each hostile one must still succeed with exact counts.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rackscope.runner.engines.base import Failed, FirstToken, Request, Tokens
from rackscope.runner.engines.openai import OpenAIEngine
from tests.helpers import rackscope_command, run_limited, wait_for
from tests.helpers.servers import LoopServer

# Real processes and servers: seconds each (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow

MODEL = "hostile-model"
GIANT_LINE_BYTES = 100 * 1024 * 1024
WRITE_BYTES = 1024 * 1024  # the giant line goes out in writes of this size
HEALTHY_TOKENS = 20

HEAD_SSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _token(k: int) -> bytes:
    return _event({"id": "c1", "object": "text_completion", "choices": [{"index": 0, "text": f" t{k}"}]})


# What each malformed mode sends in place of one token event. Every one of them carries the
# completions content pattern, so a client that counts bytes without checking would count it.
BAD_EVENTS: dict[str, bytes] = {
    "invalid_json": b'data: {"choices":[{"index":0,"text":" t"}]\n\n',
    "not_json": b'data: tokens "text":" t" follow\n\n',
    "json_array": b'data: [{"index":0,"text":" t"}]\n\n',
    "choices_not_a_list": b'data: {"choices":{"index":0,"text":" t"}}\n\n',
    "content_outside_choices": b'data: {"text":" t"}\n\n',
    "two_lines_one_event": b'data: {"choices":[{"index":0,"text":" t"}],\n"x":1}\n\n',
    "usage_not_a_number": b'data: {"choices":[],"usage":{"completion_tokens":"20","prompt_tokens":3}}\n\n',
}
CHAT_BAD_EVENTS: dict[str, bytes] = {
    "chat_invalid_json": b'data: {"choices":[{"index":0,"delta":{"content":" t"}}]\n\n',
    "chat_content_not_in_choices": b'data: {"delta":{"content":" t"}}\n\n',
}
ALL_BAD_EVENTS = {**BAD_EVENTS, **CHAT_BAD_EVENTS}


@dataclass
class Served:
    request_id: str
    mode: str
    sent_bytes: int = 0
    client_left: bool = False


class HostileServer(LoopServer):
    """An OpenAI-compatible server on 127.0.0.1 that answers each request the way it is told.

    The mode comes from ``x_hostile`` in the request body (the engine passes ``Request.extra``
    through) or, for clients that cannot add fields, from ``modes`` keyed by X-Request-Id.
    """

    def __init__(self, modes: dict[str, str] | None = None) -> None:
        super().__init__("hostile-server")
        self.modes = modes or {}
        self.served: dict[str, Served] = {}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path, _ = head[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                if method == "GET" and path == "/v1/models":
                    body = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                    writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    continue
                req = json.loads(raw)
                rid = headers.get("x-request-id", "")
                mode = str(req.get("x_hostile") or self.modes.get(rid, "healthy"))
                served = self.served[rid] = Served(rid, mode)
                await self._respond(writer, served, req)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return  # the client left, or the server is closing

    async def _send(self, w: asyncio.StreamWriter, served: Served, data: bytes) -> None:
        try:
            w.write(data)
            await w.drain()
        except ConnectionError:
            served.client_left = True
            raise
        served.sent_bytes += len(data)

    async def _respond(self, w: asyncio.StreamWriter, served: Served, req: dict[str, Any]) -> None:
        mode = served.mode
        n = int(req.get("max_tokens") or HEALTHY_TOKENS)
        itl_s = float(req.get("x_itl_s", 0.002))
        if mode == "healthy":
            await self._send(w, served, HEAD_SSE)
            for k in range(n):
                await asyncio.sleep(itl_s)
                await self._send(w, served, _chunk(_token(k)))
            await self._send(w, served, _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        elif mode in ALL_BAD_EVENTS:
            await self._send(w, served, HEAD_SSE)
            before = int(req.get("x_valid_before", 2))
            for k in range(before):
                await self._send(w, served, _chunk(_token(k)))
                await asyncio.sleep(itl_s)
            bad = _chunk(ALL_BAD_EVENTS[mode])
            if req.get("x_split"):
                # In small pieces, so the client meets it buffered, not in one read.
                for i in range(0, len(bad), 5):
                    await self._send(w, served, bad[i : i + 5])
                    await asyncio.sleep(0.001)
            else:
                await self._send(w, served, bad)
            for k in range(before, n):
                await asyncio.sleep(itl_s)
                await self._send(w, served, _chunk(_token(k)))
            await self._send(w, served, _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        elif mode == "events":
            # The payloads given, one event a chunk a write; the one at x_split goes out in two
            # writes, so the client meets it in pieces and not as one read; from x_group on,
            # the chunks go out four to a write.
            await self._send(w, served, HEAD_SSE)
            group = req.get("x_group", -1)
            framed_events = [_chunk(b"data: " + p.encode("latin-1") + b"\n\n") for p in req["x_events"]]
            if group >= 0:
                framed_events[group : group + 4] = [b"".join(framed_events[group : group + 4])]
            for k, framed in enumerate(framed_events):
                await asyncio.sleep(itl_s)
                if k == req.get("x_split"):
                    await self._send(w, served, framed[: len(framed) // 2])
                    await asyncio.sleep(itl_s)
                    await self._send(w, served, framed[len(framed) // 2 :])
                else:
                    await self._send(w, served, framed)
            await self._send(w, served, _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        elif mode == "compressed":
            body = gzip.compress(b"".join(_token(k) for k in range(n)) + b"data: [DONE]\n\n")
            await self._send(w, served, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
            await self._send(w, served, b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        elif mode == "error_body_endless":
            await self._send(w, served, b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n")
            await self._send(w, served, b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(b'{"error": "' + b"e" * 1000))
            while True:
                await self._send(w, served, _chunk(b"e" * 65536))
        elif mode == "endless_trailer":
            await self._send(w, served, HEAD_SSE + b"".join(_chunk(_token(k)) for k in range(n)) + b"0\r\n")
            while True:
                await self._send(w, served, b"X-Padding: " + b"p" * 65536 + b"\r\n")
        elif mode == "not_an_event_stream":
            body = json.dumps({"choices": [{"index": 0, "text": " t0"}], "usage": {"completion_tokens": n}}).encode()
            await self._send(w, served, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
            await self._send(w, served, b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        elif mode in ("chunk_size_short", "chunk_without_crlf"):
            await self._send(w, served, HEAD_SSE)
            bad = int(req.get("x_valid_before", 2))
            for k in range(n):
                await asyncio.sleep(itl_s)
                data = _token(k)
                if k == bad and mode == "chunk_size_short":
                    framed = b"%x\r\n%s\r\n" % (len(data) - 1, data)  # the size leaves out a byte
                elif k == bad:
                    framed = b"%x\r\n%sXY" % (len(data), data)  # no CRLF after the chunk's data
                else:
                    framed = _chunk(data)
                await self._send(w, served, framed)
            await self._send(w, served, _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        elif mode == "endless":
            await self._send(w, served, HEAD_SSE)
            k = 0
            while True:
                await asyncio.sleep(itl_s)
                await self._send(w, served, _chunk(_token(k)))
                k += 1
        elif mode == "giant_line":
            await self._send(w, served, HEAD_SSE + _chunk(_token(0)))
            await self._send(w, served, _chunk(b'data: {"choices":[{"index":0,"text":"'))
            block = _chunk(b"a" * WRITE_BYTES)
            for _ in range(GIANT_LINE_BYTES // WRITE_BYTES):
                await self._send(w, served, block)
            # Never ends the line; hang up so that a client still reading sees the end.
            raise ConnectionError("giant line sent")
        elif mode == "trickle":
            # Valid events, one byte at a time: never silent for long, never finished.
            await self._send(w, served, HEAD_SSE)
            k = 0
            while True:
                for byte in _chunk(_token(k)):
                    await asyncio.sleep(itl_s)
                    await self._send(w, served, bytes([byte]))
                k += 1
        elif mode == "trickle_head":
            for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 1_000_000:
                await asyncio.sleep(itl_s)
                await self._send(w, served, bytes([byte]))
        else:
            raise AssertionError(f"unknown mode {mode!r}")


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    with HostileServer() as s:
        yield s


def hreq(mode: str, rid: str, tokens: int = HEALTHY_TOKENS, **extra: object) -> Request:
    return Request(rid, prompt="p", max_output_tokens=tokens, extra={"x_hostile": mode, **extra})


async def engine_for(server: HostileServer, **kw: Any) -> OpenAIEngine:
    engine = OpenAIEngine(server.base_url, MODEL, **kw)
    await engine.start()
    return engine


def assert_healthy(rec: Any) -> None:
    assert rec.ok, rec.error
    assert (rec.output_tokens, rec.output_tokens_method) == (HEALTHY_TOKENS, "counted")
    assert rec.itl_s is not None
    assert len(rec.itl_s) == HEALTHY_TOKENS - 1


@pytest.mark.parametrize(
    "mode", [*BAD_EVENTS, "not_an_event_stream", "compressed", "chunk_size_short", "chunk_without_crlf"]
)
@pytest.mark.parametrize("before", [0, 2])
async def test_malformed_response_is_a_protocol_failure_with_no_tokens(
    hostile: HostileServer, mode: str, before: int
) -> None:
    engine = await engine_for(hostile)
    bad, good = await asyncio.gather(
        engine.record(hreq(mode, "bad", x_valid_before=before)), engine.record(hreq("healthy", "good"))
    )
    assert not bad.ok
    assert bad.error_type == "protocol", bad.error
    assert bad.output_tokens == 0
    assert bad.first_token_s is None
    assert_healthy(good)
    assert (engine.error_counts["protocol"], engine.error_counts.total()) == (1, 1)
    # The connection that carried the bad response is gone; the engine keeps serving.
    assert_healthy(await engine.record(hreq("healthy", "after")))
    await engine.stop()


# One content event of a stream, changed: the client must judge it the same whether it arrives
# as a read of its own or four chunks to a read (the fast path, which knows the stream's shape
# by then) or in pieces (the general path). None means the change keeps it well-formed. The
# payloads are bytes written as latin-1 text; %s is where the content string goes.
EVENTS = {
    "completions": '{"id":"c1","object":"text_completion","choices":[{"index":0,"text":"%s","finish_reason":null}]}',
    "chat": '{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%s",'
    '"reasoning_content":null},"finish_reason":null}]}',
}
CHANGES: dict[str, tuple[str, str | None]] = {  # what goes in (or how the event changes), outcome
    "plain": (" t", None),
    "utf8": ("\u00e9t\u00e9 \u4e16".encode().decode("latin-1"), None),  # sent as its UTF-8 bytes
    "escaped_quote": ('\\"', None),
    "escaped_newline": ("a\\nb", None),
    "long": ("x" * 5000, None),
    "bare_quote": ('a"b', "protocol"),
    "bare_backslash": ("a\\", "protocol"),
    "raw_newline": ("a\nb", "protocol"),
    "raw_cr": ("a\rb", "protocol"),
    "control_char": ("a\x01b", "protocol"),
    "invalid_utf8": ("a\xffb", "protocol"),
    "truncated_utf8": ("a\xc3", "protocol"),
    "string_breakout": ('x","{key}":"y', None),  # a second content key in the same object
    "choices_object": ("", "protocol"),
    "missing_brace": ("", "protocol"),
    "usage_bad": ("", "protocol"),
    "error_field": ("", "protocol"),
    "whitespace_newline": ("", "protocol"),
}


def changed_event(api: str, change: str) -> str:
    event = EVENTS[api]
    if change == "choices_object":
        return event.replace('"choices":[', '"choices":{"a":').replace("}]}", "}}}") % " t"
    if change == "missing_brace":
        return event[:-1] % " t"
    if change == "usage_bad":
        return event[:-1] % " t" + ',"usage":{"completion_tokens":"x"}}'
    if change == "error_field":
        return event[:-1] % " t" + ',"error":{"message":"boom"}}'
    if change == "whitespace_newline":
        return event.replace(',"choices"', ',\n"choices"') % " t"
    key = "content" if api == "chat" else "text"
    return event % CHANGES[change][0].replace("{key}", key)


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("api", EVENTS)
async def test_fast_and_general_paths_judge_an_event_alike(hostile: HostileServer, api: str, change: str) -> None:
    expected = CHANGES[change][1]
    n = 12
    events = [EVENTS[api] % f" t{k}" for k in range(n)]
    events[8] = changed_event(api, change)
    engine = await engine_for(hostile, api=api)
    whole = await engine.record(hreq("events", "whole", x_events=events, x_itl_s=0.003))
    grouped = await engine.record(hreq("events", "grouped", x_events=events, x_group=6, x_itl_s=0.003))
    pieces = await engine.record(hreq("events", "pieces", x_events=events, x_split=8, x_itl_s=0.003))
    outcome = [(r.ok, r.error_type, r.output_tokens) for r in (whole, grouped, pieces)]
    assert outcome[0] == outcome[1] == outcome[2], (whole.error, grouped.error, pieces.error)
    if expected is None:
        tokens = n + 1 if change == "string_breakout" else n
        assert outcome[0] == (True, None, tokens), whole.error
    else:
        # A server's error event keeps what came before it; a malformed event voids the response.
        assert outcome[0] == (False, expected, 8 if change == "error_field" else 0), whole.error
    await engine.stop()


@pytest.mark.parametrize("mode", ["invalid_json", "json_array", "two_lines_one_event", "usage_not_a_number"])
async def test_malformed_event_arriving_in_pieces_fails_the_same(hostile: HostileServer, mode: str) -> None:
    engine = await engine_for(hostile)
    rec = await engine.record(hreq(mode, "bad", x_split=True))
    assert (rec.ok, rec.error_type, rec.output_tokens, rec.first_token_s) == (False, "protocol", 0, None)
    await engine.stop()


@pytest.mark.parametrize(
    ("mode", "error_type", "says"),
    [("error_body_endless", "http_5xx", "longer than"), ("endless_trailer", "protocol", "trailer too large")],
)
async def test_endless_bodies_are_cut_at_their_cap(
    hostile: HostileServer, mode: str, error_type: str, says: str
) -> None:
    engine = await engine_for(hostile)
    t0 = time.perf_counter()
    async with asyncio.timeout(30):
        rec, good = await asyncio.gather(engine.record(hreq(mode, "endless")), engine.record(hreq("healthy", "good")))
    assert not rec.ok
    assert rec.error_type == error_type
    assert rec.error is not None
    assert says in rec.error
    assert time.perf_counter() - t0 < 5.0
    assert_healthy(good)
    await engine.stop()


@pytest.mark.parametrize("mode", ["invalid_json", "json_array", "not_an_event_stream", "chunk_size_short"])
async def test_malformed_stream_ends_in_failed_with_no_tokens(hostile: HostileServer, mode: str) -> None:
    engine = await engine_for(hostile)
    events = [ev async for ev in engine.stream(hreq(mode, "bad", x_valid_before=0))]
    assert not any(isinstance(ev, FirstToken | Tokens) for ev in events)
    assert len(events) == 1
    failed = events[0]
    assert isinstance(failed, Failed)
    assert (failed.error_type, failed.output_tokens) == ("protocol", 0)
    await engine.stop()


@pytest.mark.parametrize("mode", CHAT_BAD_EVENTS)
async def test_chat_malformed_event_fails(hostile: HostileServer, mode: str) -> None:
    engine = await engine_for(hostile, api="chat")
    rec = await engine.record(hreq(mode, "bad"))
    assert (rec.ok, rec.error_type, rec.output_tokens) == (False, "protocol", 0)
    await engine.stop()


@pytest.mark.parametrize(("mode", "itl_s"), [("endless", 0.002), ("trickle", 0.01), ("trickle_head", 0.01)])
async def test_endless_responses_end_at_the_request_deadline(hostile: HostileServer, mode: str, itl_s: float) -> None:
    deadline_s = 1.5
    # The server is never silent for the silence timeout: only the deadline can end these.
    engine = await engine_for(hostile, timeout_s=1.0, request_deadline_s=deadline_s)
    t0 = time.perf_counter()
    endless, good = await asyncio.gather(
        engine.record(hreq(mode, "endless", x_itl_s=itl_s)), engine.record(hreq("healthy", "good"))
    )
    elapsed_s = time.perf_counter() - t0
    assert not endless.ok
    assert endless.error_type == "timeout"
    assert endless.error is not None
    assert "deadline" in endless.error
    assert deadline_s <= elapsed_s < deadline_s + 2.0
    assert endless.end_s is not None
    assert deadline_s <= endless.end_s - endless.start_s < deadline_s + 2.0
    if mode == "endless":
        assert endless.output_tokens > 10  # what arrived before the deadline was real
    assert_healthy(good)
    await engine.stop()


async def test_giant_line_is_refused_without_reading_it(hostile: HostileServer) -> None:
    engine = await engine_for(hostile)
    t0 = time.perf_counter()
    async with asyncio.timeout(30):
        giant, good = await asyncio.gather(
            engine.record(hreq("giant_line", "giant")), engine.record(hreq("healthy", "good", x_itl_s=0.01))
        )
    elapsed_s = time.perf_counter() - t0
    assert not giant.ok
    assert giant.error_type == "protocol"
    assert giant.error is not None
    assert "longer than" in giant.error
    assert giant.output_tokens == 0
    assert elapsed_s < 5.0
    assert_healthy(good)
    wait_for("the server to see the client hang up", lambda: hostile.served["giant"].client_left)
    # Socket buffers hold a few MiB at most; the rest of the line was never sent.
    assert hostile.served["giant"].sent_bytes < GIANT_LINE_BYTES // 4
    await engine.stop()


@dataclass
class CliRun:
    returncode: int
    peak_rss_bytes: int
    elapsed_s: float
    output: str
    record: dict[str, Any]
    rows: dict[str, dict[str, Any]]


def run_command(server: HostileServer, run_id: str, requests: int, where: Path, *extra: str) -> CliRun:
    """``rackscope run --engine openai`` against ``server`` under the hostile-test memory limit."""
    out = where / f"{run_id}.json"
    argv = rackscope_command(
        "run", "--engine", "openai", "--url", server.base_url, "--model", MODEL,
        "--scenario", "concurrency", "--concurrency", str(requests), "--requests", str(requests), "--warmup", "0",
        "--output-len", str(HEALTHY_TOKENS), "--length-dist", "fixed", "--input-len", "8",
        "--run-id", run_id, "--output", str(out), *extra,
    )  # fmt: skip
    log_path = where / f"{run_id}.log"
    returncode, elapsed_s, peak_rss = run_limited(argv, where, log_path)
    output = log_path.read_text()
    assert out.exists(), output
    rows = {r["request_id"]: r for r in map(json.loads, out.with_suffix(".requests.jsonl").read_text().splitlines())}
    return CliRun(returncode, peak_rss, elapsed_s, output, json.loads(out.read_text()), rows)


@pytest.mark.slow
def test_run_command_refuses_a_giant_line_in_bounded_memory(tmp_path: Path) -> None:
    modes = {"hostile-0": "giant_line", "hostile-1": "invalid_json", "hostile-2": "healthy"}
    with HostileServer(modes) as server:
        calm = run_command(server, "calm", 3, tmp_path)  # the same run, all healthy: the reference
        hostile = run_command(server, "hostile", 3, tmp_path)
        giant = server.served["hostile-0"]
    assert calm.returncode == 0, calm.output
    assert calm.record["summary"]["output_tokens"] == 3 * HEALTHY_TOKENS
    assert hostile.returncode in (0, 1), hostile.output
    assert hostile.elapsed_s < calm.elapsed_s + 20
    # A buffered line would add its 100 MiB (and copies of it); the cap holds the growth to a few.
    growth_bytes = hostile.peak_rss_bytes - calm.peak_rss_bytes
    peaks = f"peak RSS {hostile.peak_rss_bytes / 2**20:.0f} MiB, calm {calm.peak_rss_bytes / 2**20:.0f} MiB"
    assert growth_bytes < 16 * 2**20, peaks
    assert giant.sent_bytes < GIANT_LINE_BYTES // 4
    summary = hostile.record["summary"]
    assert summary["requests_failed_by_error"] == {"protocol": 2}
    assert summary["requests_completed"] == 1
    assert summary["output_tokens"] == HEALTHY_TOKENS
    for rid in ("hostile-0", "hostile-1"):
        row = hostile.rows[rid]
        assert (row["ok"], row["error_type"], row["output_tokens"]) == (False, "protocol", 0)
    healthy = hostile.rows["hostile-2"]
    assert (healthy["ok"], healthy["output_tokens"]) == (True, HEALTHY_TOKENS)
    assert healthy["output_tokens_method"] == "counted"


@pytest.mark.slow
def test_run_command_ends_an_endless_stream_at_the_request_deadline(tmp_path: Path) -> None:
    with HostileServer({"dl-0": "endless", "dl-1": "healthy"}) as server:
        run = run_command(server, "dl", 2, tmp_path, "--request-deadline", "2", "--request-timeout", "1")
    assert run.returncode in (0, 1), run.output
    endless, healthy = run.rows["dl-0"], run.rows["dl-1"]
    assert (endless["ok"], endless["error_type"]) == (False, "timeout")
    assert "deadline" in endless["error"]
    assert 2.0 <= endless["e2e_s"] < 5.0
    assert (healthy["ok"], healthy["output_tokens"]) == (True, HEALTHY_TOKENS)
    assert run.record["summary"]["requests_failed_by_error"] == {"timeout": 1}
