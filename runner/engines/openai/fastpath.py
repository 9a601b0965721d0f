"""Counting content events for a fraction of what decoding them costs, without counting one
that decoding would refuse.

Consecutive content events of one response differ only in the content string (vLLM, SGLang,
TRT-LLM: same id, created, model, index; ``text`` or ``delta.content`` changes). So the first
content event of a response is decoded in full with orjson and, when it is a JSON object
with a ``choices`` list, one content string, no ``usage``, no error and no reasoning, its
bytes around that string become the response's *shape*. A later event with the same bytes
around a string body that needs no escape (no quote, no backslash, no control character)
and is valid UTF-8 is the same JSON object with another string in it: well-formed, one
content chunk, and it needs no decoding. Any other event is decoded.

``ContentShape.count_read`` is the connection's fast path: a read that is whole HTTP chunks
of one-line events, all of them content events it can vouch for; 0 sends the read to the
general path (``sse.EventDecoder``), which uses ``shaped`` and ``learn`` for the same
events, so the two paths judge every event alike.
"""

from __future__ import annotations

import orjson

_loads = orjson.loads

# What a JSON string can only hold escaped: the quote, the backslash, control characters.
NEEDS_ESCAPE = b'"\\' + bytes(range(0x20))

# The start of a read that is one chunk holding one event, by the read's length: the size line
# servers write (lowercase hex, no leading zeros, no extensions) and "data: ". Filled as
# lengths are met (a stream's events vary little in length); b"" where no size fits.
_ONE_CHUNK_HEADS: dict[int, bytes] = {}
_MAX_CACHED_HEADS = 4096


def _one_chunk_head(length: int) -> bytes:
    head = b""
    for digits in range(1, 9):
        size = length - digits - 4
        if size > 0 and len(b"%x" % size) == digits:
            head = b"%x\r\ndata: " % size
            break
    if len(_ONE_CHUNK_HEADS) >= _MAX_CACHED_HEADS:
        _ONE_CHUNK_HEADS.clear()
    _ONE_CHUNK_HEADS[length] = head
    return head


# Chunk sizes as servers write them (lowercase hex), by value: a dict lookup and a compare cost
# less than parsing each size line.
_HEX: dict[int, bytes] = {}
_HEX_GET = _HEX.get


def _hex(n: int) -> bytes:
    if len(_HEX) >= _MAX_CACHED_HEADS:
        _HEX.clear()
    text = _HEX[n] = b"%x" % n
    return text


def reasoning_chunks(data: bytes) -> int:
    """Chat chunks carrying a reasoning model's thoughts (``reasoning_content`` or ``reasoning``)."""
    n = 0
    for key in (b'"reasoning_content":', b'"reasoning":'):
        for sep in (b"", b" "):
            n += data.count(key + sep + b'"') - data.count(key + sep + b'""')
    return n


def utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ContentShape:
    """One response's content patterns and shape, and the fast path's test of a read."""

    __slots__ = (
        "api_chat", "body_cut", "end_len", "event_head", "event_tail", "head_len", "pat_empty", "pat_open", "prefixes",
        "shape_end", "shape_head", "shape_tail", "tail_len",
    )

    def __init__(self, api_chat: bool) -> None:
        self.api_chat = api_chat
        self.pat_open = b""  # '"text":"' or '"content":"', as the response spaces it, once seen
        self.pat_empty = b""
        # A vouched-for event's bytes up to its content string, and from the quote that ends it
        # (with the blank line and chunk CRLF that follow it in a read: ``shape_end``).
        self.shape_head = b""
        self.shape_tail = b""
        self.shape_end = b""
        self.head_len = self.tail_len = self.end_len = 0
        # The same around a whole event of a several-chunk read, and where its body lies.
        self.event_head = self.event_tail = b""
        self.body_cut = slice(0)
        # By the length of a one-chunk read: its chunk-size line, "data: " and the shape's head,
        # so that one startswith checks them all.
        self.prefixes: dict[int, bytes] = {}

    def shaped(self, payload: bytes) -> bool:
        """``payload`` (one event's data) is the shape around a plain content string."""
        shape = self.shape_head
        if shape and payload.startswith(shape) and payload.endswith(self.shape_tail):
            # The tail is never empty (it starts with the closing quote); when head and tail
            # overlap the body is empty, which is no content and goes the long way.
            body = payload[self.head_len : -self.tail_len]
            return bool(body) and body.translate(None, NEEDS_ESCAPE) == body and (body.isascii() or utf8(body))
        return False

    def learn(self, payload: bytes) -> None:
        """Take the shape of ``payload``, a content event just decoded and found well-formed
        (a JSON object with a choices list, no usage, no error, no reasoning, one content chunk)."""
        if payload.count(self.pat_open) != 1 or b"\n" in payload or b"\r" in payload:
            return
        start = payload.find(self.pat_open) + len(self.pat_open)
        end = payload.find(b'"', start)
        if end > start and b"\\" not in payload[start:end]:
            self.shape_head = payload[:start]
            self.shape_tail = payload[end:]
            self.shape_end = self.shape_tail + b"\n\n\r\n"
            self.head_len = start
            self.tail_len = len(payload) - end
            self.end_len = self.tail_len + 4
            self.event_head = b"data: " + self.shape_head
            self.event_tail = self.shape_tail + b"\n\n"
            self.body_cut = slice(6 + start, -self.tail_len - 2)
            self.prefixes = {}

    def count_read(self, data: bytes) -> int:
        """Content chunks in ``data`` when it is whole chunks of content events this can vouch
        for, else 0. The caller has checked that ``data`` ends with a blank line and CRLF."""
        n = len(data)
        head = _ONE_CHUNK_HEADS.get(n)
        if head is None:
            head = _one_chunk_head(n)
        if not (head and data.startswith(head)):
            return self._chunks(data)
        # One chunk holding one event. Of the shape, it needs no decoding; its length's prefix
        # (size line, "data: ", the shape's head) is kept for the connection's inline check.
        if self.shape_head:
            prefix = self.prefixes.get(n)
            if prefix is None:
                if len(self.prefixes) >= _MAX_CACHED_HEADS:
                    self.prefixes.clear()
                prefix = self.prefixes[n] = head + self.shape_head
            if data.startswith(prefix) and data.endswith(self.shape_end):
                body = data[len(prefix) : n - self.end_len]
                # The body is empty when head and tail overlap: no content, the long way.
                if body and body.translate(None, NEEDS_ESCAPE) == body and (body.isascii() or utf8(body)):
                    return 1
        return self._decoded(data[len(head) : -4])

    def _chunks(self, data: bytes) -> int:
        parts = data.split(b"\r\n")  # size, event, size, event, ..., b"" when all CRLFs are framing
        if parts[-1] or not len(parts) & 1:
            return 0
        shape = self.shape_head
        event_head = self.event_head
        event_tail = self.event_tail
        cut = self.body_cut
        total = 0
        try:  # ValueError: a size line that is not hex; the general path says what is wrong
            for i in range(1, len(parts), 2):
                event = parts[i]
                size = parts[i - 1]
                n = len(event)
                if size != (_HEX_GET(n) or _hex(n)) and int(size, 16) != n:
                    return 0
                if shape and event.startswith(event_head) and event.endswith(event_tail):
                    body = event[cut]
                    if body and body.translate(None, NEEDS_ESCAPE) == body and (body.isascii() or utf8(body)):
                        total += 1
                        continue
                if not (event.startswith(b"data: ") and event.endswith(b"\n\n")):
                    return 0
                n = self._decoded(event[6:-2])
                if n <= 0:
                    return 0
                total += n
        except ValueError:
            return 0
        return total

    def _decoded(self, payload: bytes) -> int:
        """Content chunks in one event's data, decoding it; 0 when the general path must judge it."""
        count = payload.count(self.pat_open)
        if count <= 0:
            return 0
        count -= payload.count(self.pat_empty)
        if (
            count <= 0
            or b'"error' in payload
            # Reasoning chunks are the general path's to count (reasoning_content: null is not one).
            or (self.api_chat and b'"reasoning' in payload and reasoning_chunks(payload))
            # A CR or LF would end the line there: the event's data would be something else.
            or b"\n" in payload
            or b"\r" in payload
        ):
            return 0
        try:
            obj = _loads(payload)
        except orjson.JSONDecodeError:
            return 0
        if not (type(obj) is dict and type(obj.get("choices")) is list and obj.get("usage") is None):
            return 0
        if count == 1:
            self.learn(payload)
        return count
