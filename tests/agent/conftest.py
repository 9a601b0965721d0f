"""Fixtures that run real agents: in-process (uvicorn on 127.0.0.1) or as a subprocess."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from rackscope.agent.node import NodeAgent
from rackscope.agent.settings import AgentSettings
from rackscope.agent.sources import open_source
from rackscope.clock import WallClock


@dataclass
class LiveAgent:
    agent: NodeAgent
    api: str
    metrics: str
    loop: asyncio.AbstractEventLoop


def start_agent(**overrides: Any) -> tuple[LiveAgent, Callable[[], None]]:
    """A NodeAgent serving on ephemeral ports in a thread of its own; returns a stopper."""
    settings = AgentSettings(
        **{
            "source": "sim",
            "gpus": 2,
            "gpu_model": "h100",
            "rack": "r1",
            "node": "n01",
            "interval_s": 0.2,
            "metrics_port": 0,
            "api_port": 0,
            **overrides,
        }
    ).validate()
    clock = WallClock()
    source, infos, sim_gpus = open_source(settings, clock)
    agent = NodeAgent(settings, source, infos, sim_gpus=sim_gpus, clock=clock)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        up = asyncio.Event()
        task = asyncio.create_task(agent.serve(stop, up))
        await asyncio.wait({task, asyncio.create_task(up.wait())}, return_when=asyncio.FIRST_COMPLETED)
        ready.set()
        await task

    def thread_main() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # surfaced to the test below
            failure.append(exc)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    assert ready.wait(20), "agent did not come up"
    if failure:
        raise failure[0]
    live = LiveAgent(
        agent, f"http://127.0.0.1:{agent.api_port}", f"http://127.0.0.1:{agent.telemetry.metrics_port}", loop
    )

    def stopper() -> None:
        if thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            thread.join(20)

    return live, stopper


@pytest.fixture
def live_agent() -> Iterator[LiveAgent]:
    live, stop = start_agent()
    yield live
    stop()


@pytest.fixture
def token_agent() -> Iterator[LiveAgent]:
    live, stop = start_agent(api_token="s3cret")
    yield live
    stop()


READY = re.compile(r"rackscope agent ready metrics_port=(\d+) api_port=(\d+)")


@dataclass
class AgentProcess:
    proc: subprocess.Popen[str]
    metrics_port: int
    api_port: int
    stderr_lines: list[str]


def spawn_agent(*args: str, env: dict[str, str] | None = None, timeout_s: float = 30.0) -> AgentProcess:
    """``rackscope agent ARGS`` as a real subprocess; waits for its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rackscope", "agent", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    lines: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        match = READY.search(line)
        if match:
            out = AgentProcess(proc, int(match.group(1)), int(match.group(2)), lines)
            threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True).start()
            return out
    proc.wait(timeout_s)
    raise AssertionError("agent exited before it was ready:\n" + "".join(lines))
