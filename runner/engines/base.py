"""The engine interface: a request goes in, timed events come out.

Events are few on purpose. A stream of tokens is reported as ``Tokens(count, t)`` per
arrival, not one object per token, so a client reading many tokens in one socket read, or a
simulated engine advancing a whole batch step, pays for one event. Times are monotonic
seconds from the engine's clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(slots=True)
class Request:
    request_id: str
    prompt: str | None = None
    input_ids: list[int] | None = None
    input_tokens: int = 0  # length of the prompt in tokens, when known
    max_output_tokens: int = 128
    # When True the engine should stop only at max_output_tokens (benchmarks want fixed
    # lengths); servers receive ignore_eos / min_tokens where they support it.
    ignore_eos: bool = True
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class FirstToken:
    t: float
    count: int = 1  # tokens arriving with the first chunk


@dataclass(slots=True, frozen=True)
class Tokens:
    t: float
    count: int


@dataclass(slots=True, frozen=True)
class Done:
    t: float
    input_tokens: int
    output_tokens: int
    # "usage" (the server said so), "counted" (chunks counted by the client) or "engine"
    output_tokens_method: str = "engine"
    gpu: int | None = None  # which GPU served it, when the engine knows


@dataclass(slots=True, frozen=True)
class Failed:
    t: float
    error_type: str  # "connect", "timeout", "http_4xx", "http_5xx", "protocol", "cancelled", "engine"
    message: str
    output_tokens: int = 0


EngineEvent = FirstToken | Tokens | Done | Failed


@runtime_checkable
class Engine(Protocol):
    """An async engine. ``start`` raises ``EngineUnavailable`` with a hint when it cannot run."""

    name: str
    model: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def stream(self, request: Request) -> AsyncIterator[EngineEvent]: ...

    def now(self) -> float:
        """The engine's clock (monotonic seconds) used for event times."""
        ...
