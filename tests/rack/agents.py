"""Real ``rackscope agent --source sim`` processes for rack tests, and their runs read back."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tests.helpers import rackscope_command, start_limited, stop_process

AGENT_START_TIMEOUT_S = 60.0
ACTIVE = ("pending", "running")


class AgentProcess:
    """``rackscope agent`` as a subprocess under the test memory limit; its stderr is drained
    by a thread (so the agent never blocks on a full pipe) and searched for the ready line."""

    def __init__(self, args: list[str], prefix: list[str] | None = None) -> None:
        self.proc = start_limited([*(prefix or []), *rackscope_command("agent", *args)], stdout=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.api_port = 0
        self.metrics_port = 0
        threading.Thread(target=self._drain, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("rackscope agent ready"):
                fields = dict(part.split("=", 1) for part in line.split()[3:])
                self.api_port, self.metrics_port = int(fields["api_port"]), int(fields["metrics_port"])
                self.ready.set()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + AGENT_START_TIMEOUT_S
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("agent did not start:\n" + "".join(self.lines[-30:]))

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=15.0)


@contextlib.contextmanager
def running_agents(args_per_agent: Iterable[list[str]]) -> Iterator[list[AgentProcess]]:
    """One ``AgentProcess`` per argument list, all ready before the block runs; every one
    started is stopped after it, however it ends."""
    procs: list[AgentProcess] = []
    try:
        for args in args_per_agent:
            procs.append(AgentProcess(args))
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


def sim_agent_args(node: str, tmp: Path, host: str = "127.0.0.1", extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "--source", "sim", "--gpus", "2", "--gpu-model", "gb300", "--rack", "rt", "--node", node,
        "--metrics-port", "0", "--api-port", "0", "--api-host", host,
        "--results-dir", str(tmp / f"agent-{node}"), *extra,
    ]  # fmt: skip


def get_json(url: str, timeout_s: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - a test agent on 127.0.0.1
        return json.loads(resp.read())


def runs_of(agent_url: str) -> dict[str, str]:
    """``{run_id: status}`` of every run the agent knows (its own ``GET /v1/runs``)."""
    return {r["run_id"]: r["status"] for r in get_json(f"{agent_url}/v1/runs")}


def active_runs(agent_url: str) -> list[str]:
    return [run_id for run_id, status in runs_of(agent_url).items() if status in ACTIVE]
