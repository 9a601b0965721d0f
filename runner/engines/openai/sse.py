"""Server-sent events of an OpenAI-compatible stream: whole events out of the body, each
checked before any of its tokens counts.

Content chunks are counted with ``bytes.count`` on ``"text":"`` (completions) or
``"content":"`` (chat) minus empty ones: a literal quote inside a JSON string is always
escaped, so these patterns only match JSON structure. Spaced JSON (``"text": "``) is
recognised per response; ``reasoning_content`` / ``reasoning`` chunks of reasoning models
count too. Counting bytes is only sound on well-formed events, so every ``data:`` payload is
checked as well: an event of the response's known shape is vouched for by
``fastpath.ContentShape`` (as on the connection's fast path), any other is decoded and must
be ``[DONE]`` or a JSON object whose ``choices`` (when present) is a list and which carries
content only inside one; ``usage`` must be an object of whole numbers. Anything else raises
``MalformedStream``, which fails the request as ``protocol`` with no tokens counted: a wrong
count is worse than none.
"""

from __future__ import annotations

import orjson

from rackscope.errors import PeerError
from rackscope.runner.engines.openai.fastpath import ContentShape, reasoning_chunks

# The longest event (or line) held while its end has not arrived. Real chunks are a token
# plus some JSON, a few KiB with logprobs; a peer past this is broken or hostile, and
# buffering on would let it hold the client's memory and, on every read, its CPU.
MAX_EVENT_BYTES = 1024 * 1024
REASON_CHARS = 300  # how much of a server's error text goes into the failure message

_loads = orjson.loads


class MalformedStream(PeerError):
    """The body broke the HTTP, SSE or OpenAI chunk format: fails the request, counting nothing."""


class ServerErrorEvent(PeerError):
    """The server reported an error inside the stream; ``counted`` content chunks came before it
    in the same read."""

    def __init__(self, message: str, counted: int = 0) -> None:
        super().__init__(message)
        self.counted = counted


def reason_from_body(body: bytes) -> str:
    """The human part of an error body: OpenAI ``error.message``, FastAPI ``detail``, or text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = _loads(body)
    except orjson.JSONDecodeError:
        return text[:REASON_CHARS]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:REASON_CHARS]
        if isinstance(err, str):
            return err[:REASON_CHARS]
        for key in ("message", "detail"):
            if obj.get(key):
                return str(obj[key])[:REASON_CHARS]
    return text[:REASON_CHARS]


def error_message(obj: object, payload: bytes, named: bool) -> str | None:
    """What an event says went wrong, or None when it is not an error (``named``: ``event: error``)."""
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)[:REASON_CHARS]
        if isinstance(err, str):
            return err[:REASON_CHARS]
        if obj.get("object") == "error":
            return str(obj.get("message") or obj)[:REASON_CHARS]
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason") == "error":
                return "a choice finished with reason 'error'"
    return payload.decode("utf-8", "replace")[:REASON_CHARS] if named else None


def _events_end(buf: bytes | bytearray, start: int) -> int:
    """Where the last blank line in ``buf[start:]`` ends (LF or CRLF lines), or -1."""
    end = -1
    i = buf.rfind(b"\n\n", start)
    if i >= 0:
        end = i + 2
    i = buf.rfind(b"\n\r\n", start)
    if i >= 0 and i + 3 > end:
        end = i + 3
    return end


class EventDecoder:
    """One response's event stream: buffers a partial event, checks and counts whole ones.

    ``shape`` holds the content patterns once chosen and the shape of the response's content
    events (shared with the connection's fast path), ``reasoning`` says whether reasoning
    chunks were seen, and ``usage_out`` / ``usage_in`` are the server's token counts when it
    sent them.
    """

    __slots__ = ("api_chat", "pending", "reasoning", "shape", "usage_in", "usage_out")

    def __init__(self, api_chat: bool) -> None:
        self.api_chat = api_chat
        self.shape = ContentShape(api_chat)
        # An unfinished event. Appending to a bytearray and searching only the new bytes keeps
        # the work linear in what arrives, however long the event grows before the cap.
        self.pending = bytearray()
        self.reasoning = False
        self.usage_out: int | None = None
        self.usage_in: int | None = None

    def feed(self, data: bytes) -> int:
        """Content chunks in the events that ``data`` completes; the unfinished rest is kept."""
        pending = self.pending
        if pending:
            start = max(0, len(pending) - 2)  # a blank line may straddle the join
            pending += data
            end = _events_end(pending, start)
            if end < 0:
                self._check_size()
                return 0
            events = bytes(pending[:end])
            del pending[:end]
        else:
            end = _events_end(data, 0)
            if end < 0:
                pending += data
                self._check_size()
                return 0
            events = data
            if end < len(data):
                events = data[:end]
                pending += memoryview(data)[end:]
        self._check_size()
        return self._scan(events)

    def finish(self) -> int:
        """At the end of the body: a last event that came without its blank line."""
        if not self.pending.strip():
            return 0
        data = bytes(self.pending) + b"\n\n"
        self.pending.clear()
        return self._scan(data)

    def _check_size(self) -> None:
        if len(self.pending) > MAX_EVENT_BYTES:
            raise MalformedStream(f"an event or line longer than {MAX_EVENT_BYTES} bytes")

    def _choose_patterns(self, data: bytes) -> None:
        # Compact JSON (vLLM, TRT-LLM, SGLang via pydantic) writes '"key":"'; Python's json
        # module writes '"key": "'. '":"' cannot occur inside a JSON string (the quote would
        # be escaped), so its absence together with '": "' present means spaced JSON.
        spaced = b'":"' not in data and b'": "' in data
        key = b'"content":' if self.api_chat else b'"text":'
        sep = b" " if spaced else b""
        self.shape.pat_open = key + sep + b'"'
        self.shape.pat_empty = key + sep + b'""'

    def _scan(self, events: bytes) -> int:
        if b"\r" in events:
            events = events.replace(b"\r\n", b"\n")
            if b"\r" in events:
                # A CR alone ends a line in SSE but never appears in what servers send; refusing
                # it lets lines be split on LF alone, here and on the fast path.
                raise MalformedStream("a bare CR line ending in the event stream")
        if not self.shape.pat_open:
            self._choose_patterns(events)
        blocks = events.split(b"\n\n")
        count = 0
        try:
            if events.count(b"\n") == 2 * (len(blocks) - 1):
                # Every event is one line, the usual case: no line splitting.
                for line in blocks:
                    if line.startswith(b"data:"):
                        count += self._event(b"", line[6:] if line.startswith(b"data: ") else line[5:])
                return count
            for block in blocks:
                name = b""
                data: list[bytes] = []
                for line in block.split(b"\n"):
                    if line.startswith(b"data:"):
                        data.append(line[6:] if line.startswith(b"data: ") else line[5:])
                    elif line.startswith(b"event:"):
                        name = line[6:].strip()
                if data:
                    count += self._event(name, data[0] if len(data) == 1 else b"\n".join(data))
        except ServerErrorEvent as exc:
            exc.counted = count
            raise
        return count

    def _event(self, name: bytes, payload: bytes) -> int:
        shape = self.shape
        if not name and shape.shaped(payload):
            return 1
        if payload == b"[DONE]":
            return 0
        try:
            obj = _loads(payload)
        except orjson.JSONDecodeError as exc:
            if name == b"error":
                raise ServerErrorEvent(payload.decode("utf-8", "replace")[:REASON_CHARS]) from exc
            raise MalformedStream(f"event data is not JSON ({exc}): {payload[:80]!r}") from exc
        if name == b"error" or b'"error' in payload:
            msg = error_message(obj, payload, name == b"error")
            if msg is not None:
                raise ServerErrorEvent(msg)
        if type(obj) is not dict:
            raise MalformedStream(f"event data is JSON but not an object: {payload[:80]!r}")
        n = payload.count(shape.pat_open) - payload.count(shape.pat_empty)
        thoughts = 0
        if self.api_chat and b'"reasoning' in payload:
            # Reasoning models stream their thoughts first, as "reasoning_content" (or
            # "reasoning"); once seen, the response leaves the fast path, which counts only
            # "content".
            thoughts = reasoning_chunks(payload)
            if thoughts:
                self.reasoning = True
        choices = obj.get("choices")
        if choices is not None and type(choices) is not list:
            raise MalformedStream(f"event choices is not a list: {payload[:80]!r}")
        if (n or thoughts) and choices is None:
            raise MalformedStream(f"event carries content outside a choices list: {payload[:80]!r}")
        usage = obj.get("usage")
        if usage is not None:
            self._usage(usage, payload)
        elif n == 1 and not thoughts and not name:
            shape.learn(payload)
        return n + thoughts

    def _usage(self, usage: object, payload: bytes) -> None:
        if type(usage) is not dict:
            raise MalformedStream(f"event usage is not an object: {payload[:80]!r}")
        out = usage.get("completion_tokens")
        inp = usage.get("prompt_tokens")
        for value in (out, inp):
            if value is not None and (type(value) is not int or value < 0):
                raise MalformedStream(f"event usage holds a token count that is not a whole number: {payload[:80]!r}")
        if out is not None:
            self.usage_out = out
        if inp is not None:
            self.usage_in = inp
