"""One request in flight and the record it fills, from the engine's events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from rackscope.runner.engines.base import Done, EngineEvent, Failed, FirstToken, SubmittedRequest, Tokens
from rackscope.runner.records import CANCELLED, RequestRecord


class FlightOwner(Protocol):
    """What a flight needs of the run it belongs to (``runner.runloop.Runner``)."""

    deadline: float | None  # the window's end; events after it are ignored
    tokens_received: int  # output tokens seen from any request
    keep_gaps: bool  # keep each token gap (ITL) in the record

    def finish(self, flight: Flight) -> None:
        """The request left the engine (finished, failed or stopped)."""
        ...


class Flight:
    """A request in flight and the record it fills. Events after the window's deadline are
    ignored: the request is then stopped with what it had at the deadline."""

    __slots__ = (
        "before", "cancel_fn", "carried", "done", "job", "last_t", "measured", "opaque", "rec", "run", "task",
    )

    def __init__(self, run: FlightOwner, rec: RequestRecord, measured: bool) -> None:
        self.run = run
        self.rec = rec
        self.measured = measured
        self.carried = False  # in flight (unmeasured) when the window opened
        self.before: int | None = None  # its output tokens at that moment, when known
        self.opaque = False  # the engine reports the request only when it ends
        self.done = False
        self.last_t = rec.start_s
        self.cancel_fn: Callable[[], None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.job: SubmittedRequest | None = None  # a submitted request's handle: its token count, on demand

    def on_event(self, ev: EngineEvent) -> None:
        if self.done:
            return
        deadline = self.run.deadline
        if deadline is not None and ev.t > deadline:
            return
        rec = self.rec
        kind = type(ev)
        if kind is Tokens:
            assert isinstance(ev, Tokens)
            rec.output_tokens += ev.count
            self.run.tokens_received += ev.count
            if self.run.keep_gaps:
                gaps = rec.itl_s if rec.itl_s is not None else []
                gaps.append(ev.t - self.last_t)
                if ev.count > 1:  # several tokens in one arrival reached us together
                    gaps.extend([0.0] * (ev.count - 1))
                rec.itl_s = gaps
            self.last_t = ev.t
        elif kind is FirstToken:
            assert isinstance(ev, FirstToken)
            rec.first_token_s = ev.t
            rec.output_tokens = ev.count
            if ev.gpu is not None:
                rec.gpu = ev.gpu
            self.run.tokens_received += ev.count
            if ev.count > 1 and self.run.keep_gaps:
                rec.itl_s = [0.0] * (ev.count - 1)
            self.last_t = ev.t
        elif kind is Done:
            assert isinstance(ev, Done)
            rec.end_s = ev.t
            rec.ok = True
            if ev.input_tokens:
                rec.input_tokens = ev.input_tokens
            self.run.tokens_received += max(0, ev.output_tokens - rec.output_tokens)
            rec.output_tokens = ev.output_tokens
            rec.output_tokens_method = ev.output_tokens_method
            if ev.gpu is not None:
                rec.gpu = ev.gpu
            if rec.first_token_s is None:  # an engine that sends everything at the end
                rec.first_token_s = ev.t
            self.run.finish(self)
        elif kind is Failed:
            assert isinstance(ev, Failed)
            rec.end_s = ev.t
            rec.ok = False
            rec.error_type = ev.error_type
            rec.error = ev.message
            self.run.tokens_received += max(0, ev.output_tokens - rec.output_tokens)
            rec.output_tokens = max(rec.output_tokens, ev.output_tokens)
            self.run.finish(self)

    def stop(self, t: float, why: str) -> None:
        """Stop it where it is (deadline, cancel or abort): recorded as ``cancelled``."""
        if self.done:
            return
        rec = self.rec
        if self.job is not None:  # a simulated request cut short: the tokens it had by now count
            so_far = int(self.job.tokens_so_far)
            if so_far > rec.output_tokens:
                self.run.tokens_received += so_far - rec.output_tokens
                rec.output_tokens = so_far
        rec.ok = False
        rec.end_s = t
        rec.error_type = CANCELLED
        rec.error = why
        if self.cancel_fn is not None:
            # Withdrawn first: the engine's live token count drops the request before its
            # tokens are recorded, so a collector in between never counts them twice.
            self.cancel_fn()
        self.run.finish(self)
        if self.task is not None:
            self.task.cancel()
