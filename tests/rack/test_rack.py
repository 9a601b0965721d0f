"""Synchronized rack runs across real agent processes, driven through ``rackscope rack run``.

The agents listen on 127.0.0.1 and, where the machine allows, in separate network namespaces."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rackscope.rack.coordinator import RackRun
from rackscope.rack.record import SCHEMA
from rackscope.rack.spec import RackRunSpec
from tests.helpers import stop_process, wait_for
from tests.rack.agents import AgentProcess, running_agents, runs_of, sim_agent_args


# --- real agents ---------------------------------------------------------------------------------
@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    with running_agents(sim_agent_args(f"n0{i}", tmp_path) for i in (1, 2, 3)) as procs:
        yield procs


def _rack_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rackscope", "rack", "run", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_bundle(out: Path, record: dict[str, object], completed: list[str]) -> None:
    assert json.loads((out / "rack.json").read_text()) == record
    config = json.loads((out / "config.json").read_text())
    assert config["schema"] == SCHEMA
    assert config["run"]["engine"] == "sim"
    for node in completed:
        folder = out / "nodes" / node
        run_files = sorted(p.name for p in folder.glob("*.json") if p.name not in ("node.json", "run.json"))
        assert len(run_files) == 1, run_files
        run_record = json.loads((folder / run_files[0]).read_text())
        assert run_record["schema"] == "rackscope.run/1"
        rows = (folder / run_files[0].replace(".json", ".requests.jsonl")).read_text().splitlines()
        assert rows
        assert all(json.loads(r)["request_id"] for r in rows)
        assert json.loads((folder / "node.json").read_text())["node"] == node
        assert json.loads((folder / "run.json").read_text())["status"] == "completed"
        assert (folder / "agent.log").stat().st_size > 0
    assert not list(out.rglob(".*.tmp.*"))


@pytest.mark.slow
def test_rack_run_across_agent_processes(agents: list[AgentProcess], tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    urls = ",".join(f"http://127.0.0.1:{a.api_port}" for a in agents)
    started = time.monotonic()
    res = _rack_cli(
        # Short requests, so some finish inside the 2 s window and have latencies.
        "--agents", urls, "--duration", "2", "--warmup", "0", "--output-len", "8", "--input-len", "128",
        "--output", str(out), "--json", "--poll-interval", "0.2",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(res.stdout)
    s = record["summary"]
    assert record["schema"] == SCHEMA
    assert record["rack"] == "rt"
    assert record["state"] == "finished"
    assert s["complete"] is True
    assert s["nodes"] == 3
    assert s["nodes_completed"] == 3
    assert s["gpus"] == 6
    nodes = {n["node"]: n for n in record["nodes"]}
    assert set(nodes) == {"n01", "n02", "n03"}
    assert s["output_tokens_per_s"] == pytest.approx(math.fsum(n["output_tokens_per_s"] for n in nodes.values()))
    assert s["energy_j"] == pytest.approx(math.fsum(n["energy_j"] for n in nodes.values()))
    assert s["output_tokens_per_j"] == pytest.approx(s["output_tokens"] / s["energy_j"])
    assert s["output_tokens_per_s"] > 0
    assert s["power_w"] > 0
    spread = s["node_output_tokens_per_s"]
    assert spread["min"] <= spread["median"] <= spread["max"]
    # One common start: every node started within a fraction of a second of the others.
    assert s["start_spread_s"] < 0.5
    assert all(abs(n["started_at"] - record["start_at"]) < 0.5 for n in nodes.values())
    assert s["ttft_s"]["count"] > 0
    assert s["e2e_s"]["p50"] > 0
    _assert_bundle(out, record, ["n01", "n02", "n03"])
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_rack_run_exit_codes_for_bad_flags(tmp_path: Path) -> None:
    res = _rack_cli("--duration", "1", timeout=60)
    assert res.returncode == 2
    assert "no agents" in res.stderr
    res = _rack_cli("--agents", "http://127.0.0.1:9", "--scenario", "server", "--duration", "1", timeout=60)
    assert res.returncode == 2
    assert "rate" in res.stderr
    res = _rack_cli("--agents", "http://127.0.0.1:9", timeout=60)
    assert res.returncode == 2
    assert "how long" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_cancels_the_runs_and_keeps_the_bundle(
    agents: list[AgentProcess], tmp_path: Path, signum: signal.Signals, status: int
) -> None:
    out = tmp_path / "bundle"
    urls = [a.url for a in agents]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rackscope", "rack", "run", "--agents", ",".join(urls), "--duration", "60",
         "--warmup", "0", "--run-id", "longrun", "--output", str(out), "--poll-interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for("every agent running", lambda: all(runs_of(u).get("longrun") == "running" for u in urls), 60)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    assert proc.returncode == status, err
    assert f"stopped by {signum.name}; what was collected is in" in err
    record = json.loads((out / "rack.json").read_text())
    assert record["state"] == "interrupted"
    assert record["error"] == f"interrupted by {signum.name}"
    assert record["summary"]["complete"] is False
    assert {n["status"] for n in record["nodes"]} == {"cancelled"}
    # The agents were told: their runs stop instead of running on for a minute.
    wait_for("the runs cancelled", lambda: all(runs_of(u)["longrun"] == "cancelled" for u in urls), 10)


@pytest.mark.slow
def test_unreachable_agents_exit_1_and_leave_a_bundle(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "bundle"
    res = _rack_cli("--agents", f"127.0.0.1:{port}", "--duration", "1", "--output", str(out), timeout=60)
    assert res.returncode == 1
    assert "no agent answered" in res.stderr
    record = json.loads((out / "rack.json").read_text())
    assert record["state"] == "finished"
    assert record["summary"]["complete"] is False
    assert record["nodes"][0]["status"] == "unreachable"
    assert record["nodes"][0]["agent"] == f"http://127.0.0.1:{port}"


@pytest.mark.slow
async def test_agent_killed_mid_run_is_marked_and_the_others_complete(
    agents: list[AgentProcess], tmp_path: Path
) -> None:
    import asyncio

    out = tmp_path / "bundle"
    spec = RackRunSpec(
        agents=[f"http://127.0.0.1:{a.api_port}" for a in agents],
        run={"engine": "sim", "scenario": "offline", "duration_s": 3.0, "warmup_auto": False},
        output_dir=out,
        poll_interval_s=0.2,
        lost_after_s=1.5,
    )
    coordinator = RackRun(spec)
    task = asyncio.create_task(coordinator.run())
    while coordinator.start_at is None or time.time() < coordinator.start_at + 1.0:
        assert not task.done()
        await asyncio.sleep(0.05)
    victim = agents[1]
    victim.proc.kill()
    victim.proc.wait()
    record = await asyncio.wait_for(task, 60)
    s = record["summary"]
    assert s["complete"] is False
    assert s["nodes"] == 3
    assert s["nodes_completed"] == 2
    assert s["nodes_failed"] == 1
    lost = {n["node"]: n for n in record["nodes"]}["n02"]
    assert lost["status"] == "lost"
    assert "stopped answering" in lost["error"]
    assert [f["node"] for f in s["failed_nodes"]] == ["n02"]
    assert s["output_tokens_per_s"] > 0
    assert s["gpus_measured"] == 4
    _assert_bundle(out, record, ["n01", "n03"])
    # What the dead node said before it died is in the bundle too.
    assert json.loads((out / "nodes/n02/node.json").read_text())["node"] == "n02"
    assert json.loads((out / "nodes/n02/run.json").read_text())["status"] in ("pending", "running")


# --- separate hosts: network namespaces joined by veth pairs ----------------------------------------
def _netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the ip tool (iproute2) is not installed"
    probe = f"rsprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if res.returncode != 0:
        return f"ip netns add failed: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


class Netns:
    """A namespace with a veth pair to the host: host side 10.231.<k>.1/30, inside .2/30."""

    def __init__(self, k: int) -> None:
        tag = f"{os.getpid() % 10000}{k}"
        self.name, self.host_if, self.ns_if = f"rs{tag}", f"rsh{tag}", f"rsn{tag}"
        self.host_ip, self.ip = f"10.231.{k}.1", f"10.231.{k}.2"
        self._run("ip", "netns", "add", self.name)
        self._run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._run("ip", "link", "set", self.ns_if, "netns", self.name)
        self._run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self._run("ip", "link", "set", self.host_if, "up")
        self._run(*self.exec_prefix, "ip", "addr", "add", f"{self.ip}/30", "dev", self.ns_if)
        self._run(*self.exec_prefix, "ip", "link", "set", self.ns_if, "up")
        self._run(*self.exec_prefix, "ip", "link", "set", "lo", "up")

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    @staticmethod
    def _run(*cmd: str) -> None:
        subprocess.run(list(cmd), check=True, capture_output=True)

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


@pytest.mark.slow
def test_rack_run_across_network_namespaces(tmp_path: Path) -> None:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(f"separate-host part skipped: {reason}")
    spaces: list[Netns] = []
    procs: list[AgentProcess] = []
    try:
        for k in (1, 2):
            spaces.append(Netns(k))
        for k, ns in enumerate(spaces, start=1):
            procs.append(
                AgentProcess(
                    sim_agent_args(f"h{k}", tmp_path, host=ns.ip, extra=("--api-token", "s3cret")),
                    prefix=ns.exec_prefix,
                )
            )
        for p in procs:
            p.wait_ready()
        urls = ",".join(f"http://{ns.ip}:{p.api_port}" for ns, p in zip(spaces, procs, strict=True))
        out = tmp_path / "bundle"
        # Without the token the agents refuse the run: every node rejected, exit 1.
        res = _rack_cli(
            "--agents", urls, "--duration", "1", "--warmup", "0", "--output", str(tmp_path / "nope"), "--json"
        )
        assert res.returncode == 1, res.stderr[-2000:]
        assert {n["status"] for n in json.loads(res.stdout)["nodes"]} == {"rejected"}
        env = {**os.environ, "RACKSCOPE_API_TOKEN": "s3cret"}
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "rackscope",
                "rack",
                "run",
                "--agents",
                urls,
                "--duration",
                "2",
                "--warmup",
                "0",
                "--output",
                str(out),
                "--json",
                "--poll-interval",
                "0.2",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        record = json.loads(res.stdout)
        assert record["summary"]["complete"] is True
        assert record["summary"]["nodes_completed"] == 2
        assert [n["agent"] for n in record["nodes"]] == urls.split(",")
        _assert_bundle(out, record, ["h1", "h2"])
    finally:
        for p in procs:
            p.stop()
        for ns in spaces:
            ns.delete()
