"""Where one exchange's results go: a ``RequestRecord``, a queue of engine events, or a plain body."""

from __future__ import annotations

import asyncio
from array import array
from operator import sub

from rackscope.runner.engines.base import Done, EngineEvent, Failed, Tokens
from rackscope.runner.records import RequestRecord


class Sink:
    """Receives one exchange's outcome; the connection calls these from ``data_received``."""

    __slots__ = ()

    def sent(self, t: float) -> None:
        """The request's bytes were handed to the transport at ``t``."""

    def tokens(self, t: float, count: int) -> None:
        raise NotImplementedError

    def done(self, t: float, output_tokens: int | None, input_tokens: int | None, counted: int) -> None:
        raise NotImplementedError

    def failed(self, t: float, error_type: str, message: str, counted: int) -> None:
        raise NotImplementedError


class RecordSink(Sink):
    """Fills a ``RequestRecord``; wakes its task once, at the end.

    Arrival times are not passed through this object: the connection appends them to
    ``arrivals`` itself (one C-level append per read), and ``done`` turns them into the
    first-token time and the gaps. ``arrivals`` is an array of doubles, so a stream keeps no
    Python object per token while it runs (and gives the garbage collector nothing to walk);
    its length is the tokens counted so far, which ``OpenAIEngine.live_output_tokens`` reads.
    The record's start is when the request was handed to the transport (``sent``), not when
    its task was scheduled.
    """

    __slots__ = ("arrivals", "fut", "rec")

    def __init__(self, rec: RequestRecord, fut: asyncio.Future[None]) -> None:
        self.rec = rec
        self.fut = fut
        self.arrivals = array("d")

    def sent(self, t: float) -> None:
        self.rec.start_s = t

    def tokens(self, t: float, count: int) -> None:
        self.arrivals.extend([t] * count)

    def _timings(self) -> None:
        arr = self.arrivals
        if arr:
            rec = self.rec
            rec.first_token_s = arr[0]
            # Chunks that arrived in one read get zero gaps between them.
            rec.itl_s = list(map(sub, arr[1:], arr))  # C-level loop: ~3x a comprehension

    def done(self, t: float, output_tokens: int | None, input_tokens: int | None, counted: int) -> None:
        self._timings()
        rec = self.rec
        rec.end_s = t
        if output_tokens is None:
            rec.output_tokens = counted
            rec.output_tokens_method = "counted"
        else:
            rec.output_tokens = output_tokens
            rec.output_tokens_method = "usage"
        if input_tokens is not None:
            rec.input_tokens = input_tokens
        rec.ok = True
        if not self.fut.done():
            self.fut.set_result(None)

    def failed(self, t: float, error_type: str, message: str, counted: int) -> None:
        self._timings()
        rec = self.rec
        rec.end_s = t
        rec.ok = False
        rec.error_type = error_type
        rec.error = message
        rec.output_tokens = counted
        rec.output_tokens_method = "counted"
        if not self.fut.done():
            self.fut.set_result(None)


class EventSink(Sink):
    """Queues ``EngineEvent``s for ``stream()``; wakes the consumer when it is waiting."""

    __slots__ = ("events", "finished", "input_tokens", "waiter")

    def __init__(self, input_tokens: int = 0) -> None:
        self.input_tokens = input_tokens  # the request's own figure, when the server gives none
        self.events: list[EngineEvent] = []
        self.waiter: asyncio.Future[None] | None = None
        self.finished = False

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def tokens(self, t: float, count: int) -> None:
        # The first content-bearing read becomes FirstToken; the consumer tells them apart.
        self.events.append(Tokens(t, count))
        self._wake()

    def done(self, t: float, output_tokens: int | None, input_tokens: int | None, counted: int) -> None:
        inp = self.input_tokens if input_tokens is None else input_tokens
        if output_tokens is None:
            self.events.append(Done(t, inp, counted, "counted"))
        else:
            self.events.append(Done(t, inp, output_tokens, "usage"))
        self.finished = True
        self._wake()

    def failed(self, t: float, error_type: str, message: str, counted: int) -> None:
        self.events.append(Failed(t, error_type, message, counted))
        self.finished = True
        self._wake()


class BodySink(Sink):
    """Collects a whole non-streamed body (the ``/v1/models`` check): ("", text) or (error type, message)."""

    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future[tuple[str, str]]) -> None:
        self.fut = fut

    def tokens(self, t: float, count: int) -> None:  # never called for plain bodies
        return

    def done(self, t: float, output_tokens: int | None, input_tokens: int | None, counted: int) -> None:
        raise AssertionError("plain bodies end through body()")

    def body(self, text: str) -> None:
        if not self.fut.done():
            self.fut.set_result(("", text))

    def failed(self, t: float, error_type: str, message: str, counted: int) -> None:
        if not self.fut.done():
            self.fut.set_result((error_type, message))
