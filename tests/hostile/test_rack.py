"""``rackscope rack run`` against agents that answer garbage or hang, beside real agents.

The bad agents are small aiohttp servers on 127.0.0.1 written for these tests: each answers
the probe (``GET /v1/node``) as a real agent does and then misbehaves at one call: a 201 that
is not JSON, a JSON list for a run view, a 50 MB view, fields of the wrong type, a record whose
numbers are words, a start or a cancel that never answers. The good agents are real
``rackscope agent --source sim`` processes. The coordinator runs as a real process under an
address-space limit; every assertion goes through its exit status, its bundle and the agents'
own ``GET /v1/runs``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from rackscope.rack.coordinator import RackRun
from rackscope.rack.spec import RackRunSpec
from tests.helpers import rackscope_command, start_limited, stop_process, wait_for
from tests.rack.agents import AgentProcess, active_runs, running_agents, runs_of, sim_agent_args

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
FINAL = {"completed", "failed", "cancelled", "lost", "timeout", "rejected", "unreachable"}
# How long a coordinator may take to exit once signalled: the agents' cancel answers are
# awaited for at most 3 s, then the bundle is written.
EXIT_AFTER_SIGNAL_S = 10.0


# --- a misbehaving agent ---------------------------------------------------------------------------
class FakeAgent:
    """An agent stand-in on 127.0.0.1 that probes like a real agent and then misbehaves at one
    call, named by ``misbehaviour``. ``calls`` lists every request it received."""

    def __init__(self, node: str, misbehaviour: str) -> None:
        self.node = node
        self.misbehaviour = misbehaviour
        self.calls: list[str] = []
        self.run: dict[str, Any] | None = None
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._up = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        assert self._up.wait(10), "fake agent did not start"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._release = asyncio.Event()  # what hanging handlers wait for: the end of the test
        app = web.Application()
        app.router.add_get("/v1/node", self._node)
        app.router.add_get("/v1/runs", self._list)
        app.router.add_post("/v1/runs", self._start)
        app.router.add_get("/v1/runs/{run_id}", self._view)
        app.router.add_get("/v1/runs/{run_id}/record", self._record)
        app.router.add_post("/v1/runs/{run_id}/cancel", self._cancel)
        app.router.add_get("/v1/logs", self._logs)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.SockSite(runner, self._sock).start()
        self._up.set()
        await self._stop.wait()
        self._release.set()
        await runner.cleanup()

    def _note(self, request: web.Request) -> None:
        self.calls.append(f"{request.method} {request.path}")

    def _view_of_run(self) -> dict[str, Any]:
        assert self.run is not None
        return dict(self.run)

    async def _node(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        return web.json_response({
            "rack": "rt", "node": self.node, "source": "sim", "simulated": True, "gpu_model": "NVIDIA GB300",
            "gpus": [], "version": "0.1.0", "interval_s": 1.0, "started_at": time.time(),
            "collection_errors": 0, "metrics_port": 0,
        })  # fmt: skip

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([] if self.run is None else [self._view_of_run()])

    async def _start(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        body = await request.json()
        now = time.time()
        self.run = {
            "run_id": body["run_id"], "status": "pending", "continuous": False, "start_at": body.get("start_at"),
            "config": {k: v for k, v in body.items() if k != "start_at"}, "created_at": now, "started_at": None,
            "ended_at": None, "summary": None, "record_path": None, "error": None,
        }  # fmt: skip
        if self.misbehaviour == "start-not-json":
            return web.Response(status=201, text="run accepted")
        if self.misbehaviour == "start-hangs":
            await self._release.wait()
            return web.Response(status=503)
        return web.json_response(self._view_of_run(), status=201)

    async def _view(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        if self.run is None or request.match_info["run_id"] != self.run["run_id"]:
            return web.json_response({"detail": "no such run"}, status=404)
        view = self._view_of_run()
        if view["status"] == "pending":
            self.run["status"] = view["status"] = "running"
            self.run["started_at"] = view["started_at"] = time.time()
        if self.misbehaviour == "poll-list":
            return web.json_response([view])
        if self.misbehaviour == "poll-wrong-types":
            return web.json_response({**view, "status": 7, "started_at": "yesterday"})
        if self.misbehaviour == "poll-50mb":
            return await self._fifty_megabytes(request)
        if self.misbehaviour == "record-bad-numbers":
            self.run.update(status="completed", ended_at=time.time(), record_path="/results/x.json", summary={
                "complete": True, "duration_s": 1.0, "output_tokens": 100, "output_tokens_per_s": 100.0,
                "requests_completed": 1, "requests_failed": 0, "gpus": 4,
            })  # fmt: skip
            return web.json_response(self._view_of_run())
        return web.json_response(view)

    async def _fifty_megabytes(self, request: web.Request) -> web.StreamResponse:
        # Chunked, with no Content-Length: only counting what arrives can stop it.
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            await response.write(b'{"run_id": "x", "padding": "')
            for _ in range(50):
                await response.write(b"x" * MIB)
            await response.write(b'"}')
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading, as it should
        return response

    async def _record(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        if self.misbehaviour != "record-bad-numbers" or self.run is None:
            return web.json_response({"detail": "no record yet"}, status=409)
        return web.json_response({
            "schema": "rackscope.run/1", "run_id": self.run["run_id"], "config": {}, "environment": {},
            "summary": {**self.run["summary"], "output_tokens_per_s": "fast"},
            "timeseries": {"bucket_s": 1.0, "t_s": [0.0], "output_tokens_per_s": ["fast"], "power_w": None},
        })  # fmt: skip

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        if self.misbehaviour == "cancel-hangs":
            await self._release.wait()
        if self.run is None or request.match_info["run_id"] != self.run["run_id"]:
            return web.json_response({"detail": "no such run"}, status=404)
        if self.run["status"] in ("pending", "running"):
            self.run["status"] = "cancelled"
        return web.json_response(self._view_of_run())

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        return web.Response(text="fake agent log\n")


# --- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    """Two real simulated agents, shared by this module's tests: each test uses its own run id
    and starts only when neither agent has a run active."""
    tmp = tmp_path_factory.mktemp("agents")
    with running_agents(sim_agent_args(node, tmp) for node in ("g1", "g2")) as procs:
        yield procs


@pytest.fixture
def fakes() -> Iterator[list[FakeAgent]]:
    made: list[FakeAgent] = []
    yield made
    for fake in made:
        fake.stop()


def _idle(agents: list[AgentProcess]) -> None:
    wait_for("the agents to have no active run", lambda: not any(active_runs(a.url) for a in agents), timeout_s=30)


def _one_fake(good_agents: list[AgentProcess], fakes: list[FakeAgent], node: str, misbehaviour: str) -> FakeAgent:
    """Once the real agents have no run active: one misbehaving agent, stopped after the test."""
    _idle(good_agents)
    fake = FakeAgent(node, misbehaviour)
    fakes.append(fake)
    return fake


def _coordinator(urls: list[str], out: Path, run_id: str, *flags: str) -> subprocess.Popen[str]:
    return start_limited(rackscope_command(
        "rack", "run", "--agents", ",".join(urls), "--run-id", run_id, "--output", str(out),
        "--warmup", "0", "--output-len", "8", "--input-len", "128", "--poll-interval", "0.2", *flags,
    ))  # fmt: skip


def _rack(out: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((out / "rack.json").read_text())
    return record


def _nodes(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["node"]: n for n in record["nodes"]}


def _finish(proc: subprocess.Popen[str], timeout_s: float) -> str:
    try:
        _, err = proc.communicate(timeout=timeout_s)
    finally:
        stop_process(proc)
    return err


# --- garbage -----------------------------------------------------------------------------------------
GARBAGE = {
    # misbehaviour: (the call named in the node's error, what the error says about it, whether
    # the run may still be going on the agent, so the coordinator must cancel it)
    "start-not-json": ("POST /v1/runs", "not JSON", True),
    "poll-list": ("GET /v1/runs/{run}", "a JSON array, expected an object", True),
    "poll-50mb": ("GET /v1/runs/{run}", "more than 1 MiB", True),
    "poll-wrong-types": ("GET /v1/runs/{run}", "status", True),
    "record-bad-numbers": ("GET /v1/runs/{run}/record", "summary.output_tokens_per_s", False),
}


def test_garbage_answers_fail_only_their_node(
    good_agents: list[AgentProcess], fakes: list[FakeAgent], tmp_path: Path
) -> None:
    _idle(good_agents)
    fakes.extend(FakeAgent(f"bad-{name}", name) for name in GARBAGE)
    run_id = "garbage1"
    out = tmp_path / "bundle"
    urls = [a.url for a in good_agents] + [f.url for f in fakes]
    proc = _coordinator(urls, out, run_id, "--duration", "1", "--call-timeout", "5", "--json")
    err = _finish(proc, 120)
    assert proc.returncode == 1, err[-3000:]
    record = _rack(out)
    assert record["state"] == "finished"
    nodes = _nodes(record)
    for good, agent in zip(("g1", "g2"), good_agents, strict=True):
        assert nodes[good]["status"] == "completed", nodes[good]
        assert nodes[good]["output_tokens_per_s"] > 0
        assert runs_of(agent.url)[run_id] == "completed"
    for fake in fakes:
        call, why, may_run = GARBAGE[fake.misbehaviour]
        entry = nodes[fake.node]
        assert entry["status"] == "failed", entry
        assert call.format(run=run_id) in entry["error"], entry["error"]
        assert why in entry["error"], entry["error"]
        # A run the agent may still be running is cancelled rather than left behind; one it
        # said was over is not.
        assert (f"POST /v1/runs/{run_id}/cancel" in fake.calls) is may_run, fake.calls
    summary = record["summary"]
    assert summary["complete"] is False
    assert summary["nodes_completed"] == 2
    assert sorted(f["node"] for f in summary["failed_nodes"]) == sorted(f.node for f in fakes)
    assert summary["output_tokens_per_s"] == pytest.approx(nodes["g1"]["output_tokens_per_s"]
                                                           + nodes["g2"]["output_tokens_per_s"])
    assert not list(out.rglob("*.tmp*"))


# --- hangs -----------------------------------------------------------------------------------------
def test_hung_start_does_not_hold_back_the_other_nodes(
    good_agents: list[AgentProcess], fakes: list[FakeAgent], tmp_path: Path
) -> None:
    hung = _one_fake(good_agents, fakes, "hung", "start-hangs")
    run_id = "hung1"
    deadline_s = 15.0
    out = tmp_path / "bundle"
    urls = [a.url for a in good_agents] + [hung.url]
    started = time.monotonic()
    proc = _coordinator(urls, out, run_id, "--duration", "1", "--call-timeout", f"{deadline_s:g}")

    def good_nodes_collected() -> dict[str, dict[str, Any]] | None:
        nodes = _nodes(_rack(out))
        done = all(nodes[g]["status"] == "completed" and "record" in nodes[g]["files"] for g in ("g1", "g2"))
        return nodes if done else None

    # The good nodes run, finish and are collected while the hung node's start is still out.
    nodes = wait_for("the good nodes' results", good_nodes_collected, timeout_s=deadline_s)
    assert nodes["hung"]["status"] == "starting"
    assert proc.poll() is None
    assert time.monotonic() - started < deadline_s
    err = _finish(proc, deadline_s + 30)
    # The hung node costs its own deadline and a bounded cancel, nothing more.
    assert time.monotonic() - started < deadline_s + 15
    assert proc.returncode == 1, err[-3000:]
    record = _rack(out)
    assert record["state"] == "finished"
    entry = _nodes(record)["hung"]
    assert entry["status"] == "failed"
    assert f"POST /v1/runs did not answer within {deadline_s:g} s" in entry["error"]
    assert f"POST /v1/runs/{run_id}/cancel" in hung.calls
    assert all(runs_of(a.url)[run_id] == "completed" for a in good_agents)


# --- signals ---------------------------------------------------------------------------------------
def test_sigterm_mid_run_cancels_every_started_run_and_finalizes(
    good_agents: list[AgentProcess], fakes: list[FakeAgent], tmp_path: Path
) -> None:
    hung = _one_fake(good_agents, fakes, "hung", "start-hangs")
    run_id = "term1"
    out = tmp_path / "bundle"
    proc = _coordinator([a.url for a in good_agents] + [hung.url], out, run_id, "--duration", "60",
                        "--call-timeout", "60")
    wait_for(
        "the good agents running and the hung start out",
        lambda: all(runs_of(a.url).get(run_id) == "running" for a in good_agents) and "POST /v1/runs" in hung.calls,
        timeout_s=60,
    )
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc, 30)
    assert time.monotonic() - signalled < EXIT_AFTER_SIGNAL_S
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err
    record = _rack(out)
    assert record["state"] == "interrupted"
    statuses = {n["node"]: n["status"] for n in record["nodes"]}
    assert statuses == {"g1": "cancelled", "g2": "cancelled", "hung": "cancelled"}
    assert "SIGTERM" in record["error"]
    assert record["summary"]["complete"] is False
    # The agents were told: nothing is left running on them.
    wait_for("the good agents' runs cancelled",
             lambda: all(runs_of(a.url)[run_id] == "cancelled" for a in good_agents), timeout_s=15)
    # The hung start may have landed, so the hung agent was told to cancel too.
    assert f"POST /v1/runs/{run_id}/cancel" in hung.calls


def test_second_signal_while_cancelling_still_finalizes(
    good_agents: list[AgentProcess], fakes: list[FakeAgent], tmp_path: Path
) -> None:
    stuck = _one_fake(good_agents, fakes, "stuck", "cancel-hangs")
    run_id = "twice1"
    out = tmp_path / "bundle"
    good = good_agents[0]
    proc = _coordinator([good.url, stuck.url], out, run_id, "--duration", "60", "--call-timeout", "30")
    wait_for(
        "both nodes running",
        lambda: runs_of(good.url).get(run_id) == "running" and f"GET /v1/runs/{run_id}" in stuck.calls,
        timeout_s=60,
    )
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    wait_for("the coordinator cancelling", lambda: f"POST /v1/runs/{run_id}/cancel" in stuck.calls, timeout_s=10)
    proc.send_signal(signal.SIGTERM)  # the operator is impatient: stop waiting for the agents
    err = _finish(proc, 30)
    assert time.monotonic() - signalled < EXIT_AFTER_SIGNAL_S
    assert proc.returncode == 130, err[-3000:]
    record = _rack(out)
    assert record["state"] == "interrupted"
    nodes = _nodes(record)
    assert {n["status"] for n in nodes.values()} == {"cancelled"}
    assert "cancel not confirmed" in nodes["stuck"]["error"]
    wait_for("the good agent's run cancelled", lambda: runs_of(good.url)[run_id] == "cancelled", timeout_s=15)


# --- the coordinator itself fails ----------------------------------------------------------------------
async def test_a_coordinator_error_cancels_the_started_runs_and_finalizes(
    good_agents: list[AgentProcess], tmp_path: Path
) -> None:
    await asyncio.to_thread(_idle, good_agents)
    run_id = "crash1"
    out = tmp_path / "bundle"
    spec = RackRunSpec(
        agents=[a.url for a in good_agents],
        run={"engine": "sim", "scenario": "offline", "duration_s": 60.0, "warmup_auto": False},
        output_dir=out,
        rack_run_id=run_id,
        poll_interval_s=0.2,
    )

    def view_crashes(run: RackRun) -> None:
        if all(n.status == "running" for n in run.nodes):
            raise RuntimeError("the view crashed")

    with pytest.raises(RuntimeError, match="the view crashed"):
        await asyncio.wait_for(RackRun(spec, on_change=view_crashes).run(), 60)
    record = _rack(out)
    assert record["state"] == "failed"
    assert "the view crashed" in record["error"]
    assert {n["status"] for n in record["nodes"]} == {"cancelled"}
    assert all(n["status"] in FINAL for n in record["nodes"])
    await asyncio.to_thread(
        wait_for, "the agents' runs cancelled",
        lambda: all(runs_of(a.url)[run_id] == "cancelled" for a in good_agents), 15,
    )
