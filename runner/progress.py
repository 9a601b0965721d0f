"""Live progress of a run: the snapshot a scenario reports, and a one-line terminal display."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True, slots=True)
class Progress:
    """What a scenario reports about once a second (counts cover the measured window)."""

    elapsed_s: float
    requests_done: int
    requests_failed: int
    in_flight: int
    output_tokens: int
    output_tokens_per_s: float  # over the last reporting interval
    phase: str = "measure"  # "warmup", "measure" or a sweep point such as "concurrency=8"


ProgressCallback = Callable[[Progress], None]


class TerminalProgress:
    """Rewrites one status line in place (``\\r``); call ``close()`` to end the line."""

    def __init__(self, stream: TextIO, min_interval_s: float = 0.2) -> None:
        self._stream = stream
        self._min_interval_s = min_interval_s
        self._last_write = 0.0
        self._width = 0

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last_write < self._min_interval_s:
            return
        self._last_write = now
        text = (
            f"[{p.phase}] {p.elapsed_s:6.1f} s  {p.output_tokens_per_s:12,.0f} tok/s  "
            f"{p.requests_done:,} done  {p.in_flight:,} in flight  {p.requests_failed:,} errors"
        )
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self._stream.write("\r" + text + " " * pad)
        self._stream.flush()

    def close(self) -> None:
        if self._width:
            self._stream.write("\n")
            self._stream.flush()
            self._width = 0


def terminal_progress(stream: TextIO) -> TerminalProgress | None:
    """A live display when ``stream`` is a terminal; ``None`` (quiet) otherwise."""
    isatty = getattr(stream, "isatty", None)
    return TerminalProgress(stream) if isatty is not None and isatty() else None
