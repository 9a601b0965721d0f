"""Clocks: the wall clock for real runs and a virtual clock for simulations and tests."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds. Simulations take a clock so tests can run them on virtual time."""

    def now(self) -> float: ...


class WallClock:
    """``time.monotonic``: what real runs use."""

    def now(self) -> float:
        return time.monotonic()


class VirtualClock:
    """A clock that moves only when told to; deterministic simulations in tests."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._now += seconds

    def set(self, now_s: float) -> None:
        if now_s < self._now:
            raise ValueError("a clock cannot go backwards")
        self._now = now_s
