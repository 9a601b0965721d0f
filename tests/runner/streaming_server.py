"""A small OpenAI-compatible streaming server for tests, written on raw asyncio streams.

It runs on 127.0.0.1 (port 0) in a background thread with its own event loop, so async tests
and tests that start worker processes can both use it. Raw bytes give full control of what
goes on the wire: chunked, Content-Length or until-close bodies, LF or CRLF event endings,
compact or spaced JSON, events split across chunks, errors and dropped connections.

What a response does comes from ``Behaviour``: the server's default, overridden per request
by an ``"x_test"`` object in the request body (which the engine passes through from
``Request.extra``). Every request received is kept in ``requests`` for assertions.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field, fields, replace
from typing import Any

from tests.helpers.servers import LoopServer


@dataclass
class Behaviour:
    ttft_s: float = 0.0
    itl_s: float = 0.0
    framing: str = "chunked"  # "chunked", "length" or "close"
    crlf: bool = False  # end SSE lines with CRLF (sse-starlette style)
    spaced: bool = False  # JSON with spaces after separators (Python's json module)
    events_per_write: int = 1  # several token events in one write (one chunk)
    chunks_per_write: int = 1  # several token events in one write, each its own chunk
    usage_null: bool = False  # content chunks carry "usage": null (SGLang style)
    comments: bool = False  # an SSE comment line before each event (keep-alive pings)
    split: bool = False  # cut each event into small pieces sent separately
    usage: bool = True  # honour stream_options.include_usage
    status: int = 200  # an error status returns an OpenAI-style error body
    fail_after: int = -1  # after this many tokens: do ``failure``
    failure: str = "close"  # "close" (drop the connection), "error_event", "stall"
    json_body: bool = False  # ignore stream=true and answer with one JSON body
    close_after: bool = False  # close the connection after the response, without saying so
    reasoning: int = 0  # chat: the first tokens come as "reasoning_content" (content null)
    models: list[str] = field(default_factory=lambda: ["test-model"])


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class StreamingServer(LoopServer):
    def __init__(self, behaviour: Behaviour | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__("streaming-server", ssl_context)
        self.behaviour = behaviour or Behaviour()
        self.requests: list[Received] = []
        self.connections = 0

    # -- HTTP ---------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                body = json.loads(raw) if raw else {}
                self.requests.append(Received(method, path, headers, body))
                keep = await self._respond(writer, method, path, body)
                if not keep or self._close_after(body):
                    return
        except (ConnectionError, asyncio.CancelledError):
            return

    def _close_after(self, body: dict[str, Any]) -> bool:
        return bool((body.get("x_test") or {}).get("close_after", self.behaviour.close_after))

    async def _respond(self, w: asyncio.StreamWriter, method: str, path: str, body: dict[str, Any]) -> bool:
        b = self.behaviour
        overrides = body.get("x_test") or {}
        if overrides:
            known = {f.name for f in fields(Behaviour)}
            b = replace(b, **{k: v for k, v in overrides.items() if k in known})
        if method == "GET" and path == "/v1/models":
            payload = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in b.models]})
            self._plain(w, 200, "OK", payload.encode())
            return True
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            self._plain(w, 404, "Not Found", b'{"detail":"Not Found"}')
            return True
        if b.status != 200:
            reason = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests"}.get(
                b.status, "Internal Server Error"
            )
            err = {"object": "error", "message": f"test failure {b.status}", "type": "BadRequestError"}
            self._plain(w, b.status, reason, json.dumps({"error": err}).encode())
            return True
        chat = path.endswith("chat/completions")
        tokens = int(body.get("max_tokens") or 16)
        dumps = json.dumps if b.spaced else (lambda o: json.dumps(o, separators=(",", ":")))
        sep = "\r\n" if b.crlf else "\n"
        base: dict[str, Any] = {"id": "cmpl-1", "created": 1, "model": body.get("model")}

        def event(obj: object) -> bytes:
            ping = f": ping{sep}" if b.comments else ""
            return f"{ping}data: {dumps(obj)}{sep}{sep}".encode()

        def token(k: int) -> bytes:
            finish = "length" if k == tokens - 1 else None
            extra: dict[str, Any] = {"usage": None} if b.usage_null else {}
            if chat:
                if k < b.reasoning:
                    delta: dict[str, Any] = {"content": None, "reasoning_content": f" r{k}"}
                else:
                    delta = {"content": f" t{k}", "reasoning_content": None}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                return event({**base, "object": "chat.completion.chunk", "choices": [choice], **extra})
            choice = {"index": 0, "text": f" t{k}", "logprobs": None, "finish_reason": finish}
            return event({**base, "object": "text_completion", "choices": [choice], **extra})

        usage = {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": tokens + 7}
        if b.json_body:
            text = "".join(f" t{k}" for k in range(tokens))
            full = {**base, "choices": [{"index": 0, "text": text, "finish_reason": "length"}], "usage": usage}
            self._plain(w, 200, "OK", json.dumps(full).encode())
            return True

        events: list[bytes] = []
        if chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            events.append(event({**base, "object": "chat.completion.chunk", "choices": [role]}))
        events += [token(k) for k in range(tokens)]
        first_token_event = 1 if chat else 0
        want_usage = b.usage and bool((body.get("stream_options") or {}).get("include_usage"))
        tail = [event({**base, "choices": [], "usage": usage})] if want_usage else []
        tail.append(f"data: [DONE]{sep}{sep}".encode())

        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
        if b.framing == "length":
            # The whole body must be known up front; timing is lost, counting is not.
            data = b"".join(events + tail)
            w.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
            await w.drain()
            return True
        if b.framing == "close":
            w.write(f"{head}Connection: close\r\n\r\n".encode())
        else:
            w.write(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())

        def frame(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data) if b.framing == "chunked" else data

        async def send(data: bytes) -> None:
            if b.split:
                for i in range(0, len(data), 7):
                    w.write(frame(data[i : i + 7]))
                    await w.drain()
                    await asyncio.sleep(0.001)
            else:
                w.write(frame(data))
                await w.drain()

        await asyncio.sleep(b.ttft_s)
        sent = 0
        i = 0
        while i < len(events):
            group = events[i : i + max(b.events_per_write, b.chunks_per_write)]
            n_tokens = sum(1 for j in range(i, i + len(group)) if j >= first_token_event)
            if b.fail_after >= 0 and sent + n_tokens > b.fail_after:
                return await self._fail(w, b, event, send)
            if b.chunks_per_write > 1 and not b.split:
                w.write(b"".join(frame(e) for e in group))
                await w.drain()
            else:
                await send(b"".join(group))
            sent += n_tokens
            i += len(group)
            if i < len(events) and b.itl_s:
                await asyncio.sleep(b.itl_s)
        if b.fail_after >= 0 and sent >= b.fail_after:
            return await self._fail(w, b, event, send)
        await send(b"".join(tail))
        if b.framing == "chunked":
            w.write(b"0\r\n\r\n")
            await w.drain()
            return True
        return False  # "close" framing: the end of the body is the end of the connection

    async def _fail(self, w: asyncio.StreamWriter, b: Behaviour, event: Any, send: Any) -> bool:
        if b.failure == "error_event":
            await send(event({"error": {"object": "error", "message": "engine died", "type": "InternalServerError"}}))
            await send(b"data: [DONE]\n\n")
            if b.framing == "chunked":
                w.write(b"0\r\n\r\n")
                await w.drain()
            return True
        if b.failure == "stall":
            await asyncio.sleep(3600)
        w.transport.abort()  # "close": drop the connection mid-stream
        return False

    def _plain(self, w: asyncio.StreamWriter, status: int, reason: str, payload: bytes) -> None:
        head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        w.write(head.encode() + payload)
