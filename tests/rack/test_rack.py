"""Rack runs: agent lists, aggregation math, the bundle, and synchronized runs across real
agent processes on 127.0.0.1 (and, where the machine allows, in separate network namespaces)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rackscope.errors import ConfigError
from rackscope.rack.coordinator import (
    SCHEMA,
    Bundle,
    NodeRun,
    RackRun,
    RackRunSpec,
    assemble_record,
    node_entry,
    normalize_agent_url,
    parse_agents,
    rack_timeseries,
    summarize_nodes,
)

# --- agent lists --------------------------------------------------------------------------------


def test_agent_urls_are_normalized() -> None:
    assert normalize_agent_url("n01:9470") == "http://n01:9470"
    assert normalize_agent_url(" https://n02.example:443/agent/ ") == "https://n02.example:443/agent"
    for bad in ("", "ftp://n01:1", "http://:80", "http://n01:99999", "http://n01:80/?x=1"):
        with pytest.raises(ConfigError):
            normalize_agent_url(bad)


def test_agents_from_list_and_file(tmp_path: Path) -> None:
    f = tmp_path / "agents.txt"
    f.write_text("# the rack\nhttp://10.0.0.1:9470\n\n  10.0.0.2:9470   # second node\n#10.0.0.9:1\n")
    assert parse_agents("http://a:1, b:2", f) == [
        "http://a:1",
        "http://b:2",
        "http://10.0.0.1:9470",
        "http://10.0.0.2:9470",
    ]
    with pytest.raises(ConfigError, match="listed twice"):
        parse_agents("a:1,http://a:1")
    with pytest.raises(ConfigError, match="no agents"):
        parse_agents("", None)
    with pytest.raises(ConfigError, match="cannot read"):
        parse_agents(None, tmp_path / "missing.txt")


# --- aggregation ---------------------------------------------------------------------------------
def _entry(
    node: str,
    rate: float | None,
    *,
    status: str = "completed",
    gpus: int = 4,
    energy_j: float | None = None,
    duration_s: float = 10.0,
    started_at: float = 1000.0,
) -> dict[str, object]:
    tokens = None if rate is None else rate * duration_s
    return {
        "node": node,
        "key": node,
        "rack": "r1",
        "agent": f"http://{node}:9470",
        "status": status,
        "error": None if status == "completed" else "boom",
        "run_id": "x",
        "gpus": gpus,
        "gpu_model": "NVIDIA GB300",
        "simulated": True,
        "source": "sim",
        "started_at": started_at,
        "ended_at": started_at + duration_s,
        "duration_s": duration_s,
        "output_tokens": tokens,
        "output_tokens_per_s": rate,
        "output_tokens_per_s_per_gpu": None if rate is None else rate / gpus,
        "requests_completed": 10,
        "requests_failed": 0,
        "energy_j": energy_j,
        "power_w": None if energy_j is None else energy_j / duration_s,
        "output_tokens_per_j": None if energy_j is None or tokens is None else tokens / energy_j,
        "complete": status == "completed",
        "straggler": False,
        "fraction_of_median": None,
        "files": {},
    }


def test_rack_summary_math_and_stragglers() -> None:
    entries = [
        _entry("n01", 62_000.0, energy_j=50_000.0),
        _entry("n02", 61_000.0, energy_j=50_000.0),
        _entry("n03", 57_000.0, energy_j=40_000.0),  # 57,000 / 61,000 = 93.4 % of the median: a straggler
        _entry("n04", 60_000.0, energy_j=50_000.0),  # 98.4 %: not one
        _entry("n05", None, status="lost"),
    ]
    s = summarize_nodes(entries, threshold=0.95)
    assert s["nodes"] == 5
    assert s["nodes_completed"] == 4
    assert s["nodes_failed"] == 1
    assert s["complete"] is False
    assert s["failed_nodes"] == [{"node": "n05", "agent": "http://n05:9470", "status": "lost", "error": "boom"}]
    assert s["gpus"] == 20
    assert s["gpus_measured"] == 16
    assert s["output_tokens_per_s"] == pytest.approx(240_000.0)
    assert s["output_tokens_per_s_per_gpu"] == pytest.approx(15_000.0)
    assert s["node_output_tokens_per_s"] == {
        "count": 4,
        "min": 57_000.0,
        "median": 61_000.0 - 500.0,
        "mean": 60_000.0,
        "max": 62_000.0,
    }
    assert s["energy_j"] == pytest.approx(190_000.0)
    assert s["power_w"] == pytest.approx(19_000.0)
    assert s["output_tokens_per_j"] == pytest.approx(2_400_000.0 / 190_000.0)
    (st,) = s["stragglers"]
    assert st["node"] == "n03"
    assert st["fraction_of_median"] == pytest.approx(57_000.0 / 60_500.0)
    assert st["shortfall_tokens_per_s"] == pytest.approx(3_500.0)
    assert st["shortfall_fraction"] == pytest.approx(1 - 57_000.0 / 60_500.0)
    assert [e["straggler"] for e in entries] == [False, False, True, False, False]
    # A stricter threshold catches n04 as well, slowest first.
    s2 = summarize_nodes(
        [_entry(n, r) for n, r in (("a", 100.0), ("b", 97.0), ("c", 93.0), ("d", 99.0))], threshold=0.99
    )
    assert [x["node"] for x in s2["stragglers"]] == ["c", "b"]
    assert s2["complete"] is True


def test_rack_of_no_finished_node_is_incomplete_and_empty() -> None:
    s = summarize_nodes([_entry("n01", None, status="failed")])
    assert s["complete"] is False
    assert s["output_tokens_per_s"] == 0.0
    assert s["node_output_tokens_per_s"]["median"] is None
    assert s["energy_j"] is None
    assert s["output_tokens_per_j"] is None
    assert s["stragglers"] == []


def test_rack_timeseries_aligns_nodes_by_start() -> None:
    a = _entry("a", 10.0, started_at=100.0)
    b = _entry("b", 10.0, started_at=101.0)  # started one bucket later
    c = _entry("c", None, status="failed", started_at=100.0)
    records = {
        "a": {
            "timeseries": {
                "bucket_s": 1.0,
                "t_s": [0, 1, 2],
                "output_tokens_per_s": [1.0, 2.0, 3.0],
                "power_w": [10.0, 10.0, 10.0],
            }
        },
        "b": {
            "timeseries": {
                "bucket_s": 1.0,
                "t_s": [0, 1, 2],
                "output_tokens_per_s": [5.0, 5.0, 5.0],
                "power_w": [1.0, 2.0, 3.0],
            }
        },
        "c": {"timeseries": {"bucket_s": 1.0, "t_s": [0], "output_tokens_per_s": [99.0], "power_w": [99.0]}},
    }
    ts = rack_timeseries([a, b, c], records)
    assert ts is not None
    assert ts["t_s"] == [0.0, 1.0, 2.0, 3.0]
    assert ts["output_tokens_per_s"] == [1.0, 7.0, 8.0, 5.0]
    assert ts["power_w"] == [10.0, 11.0, 12.0, 3.0]
    assert ts["nodes"] == 2


def test_node_entry_reads_the_record_summary() -> None:
    n = NodeRun(agent="http://x:1", key="n07", status="completed")
    n.identity = {
        "node": "n07",
        "rack": "r9",
        "gpus": 4,
        "gpu_model": "NVIDIA GB300",
        "simulated": True,
        "source": "sim",
    }
    n.view = {"run_id": "abc", "status": "completed", "started_at": 5.0, "ended_at": 15.0}
    n.record = {
        "summary": {
            "complete": True,
            "gpus": 4,
            "duration_s": 10.0,
            "output_tokens": 600_000,
            "output_tokens_per_s": 60_000.0,
            "energy_j": 52_000.0,
            "average_power_w": 5_200.0,
            "output_tokens_per_j": 600_000 / 52_000.0,
            "requests_completed": 2_000,
            "requests_failed": 1,
        }
    }
    e = node_entry(n)
    assert (e["node"], e["rack"], e["run_id"], e["gpus"], e["status"]) == ("n07", "r9", "abc", 4, "completed")
    assert e["output_tokens_per_s"] == 60_000.0
    assert e["power_w"] == 5_200.0
    assert e["complete"] is True


def test_record_state_controls_completeness(tmp_path: Path) -> None:
    n = NodeRun(agent="http://x:1", key="n01", status="completed", identity={"node": "n01", "gpus": 1})
    n.record = {"summary": {"complete": True, "output_tokens_per_s": 1.0, "gpus": 1}}
    done = assemble_record([n], rack_run_id="r", run={"engine": "sim"}, agents=["http://x:1"])
    assert done["schema"] == SCHEMA
    assert done["summary"]["complete"] is True
    assert done["config"] == {"engine": "sim", "agents": ["http://x:1"]}
    for state in ("running", "interrupted"):
        rec = assemble_record([n], rack_run_id="r", run={}, agents=["http://x:1"], state=state)
        assert rec["summary"]["complete"] is False
        assert rec["state"] == state


def test_bundle_writes_atomically_and_refuses_a_used_folder(tmp_path: Path) -> None:
    b = Bundle(tmp_path / "out")
    b.write_json("nodes/n01/run.json", {"a": 1})
    b.write_bytes("rack.json", b"{}\n")
    assert json.loads((tmp_path / "out/nodes/n01/run.json").read_text()) == {"a": 1}
    assert not list((tmp_path / "out").rglob("*.tmp"))
    with pytest.raises(ConfigError, match="already holds"):
        Bundle(tmp_path / "out")


def test_spec_validation() -> None:
    with pytest.raises(ConfigError):
        RackRunSpec(agents=["http://a:1"], run={}, output_dir=Path("x"), straggler_threshold=1.5).validate()
    with pytest.raises(ConfigError):
        RackRunSpec(agents=["http://a:1"], run={}, output_dir=Path("x"), rack_run_id="../evil").validate()
    spec = RackRunSpec(agents=["http://a:1"], run={"duration_s": 10}, output_dir=Path("x")).validate()
    assert spec.deadline_after_start_s() == pytest.approx(10 * 1.5 + 60)


# --- real agents ---------------------------------------------------------------------------------
AGENT_START_TIMEOUT_S = 60.0


class AgentProcess:
    """``rackscope agent`` as a subprocess; its stderr is drained by a thread (so the agent
    never blocks on a full pipe) and searched for the ready line."""

    def __init__(self, args: list[str], prefix: list[str] | None = None) -> None:
        cmd = [*(prefix or []), sys.executable, "-m", "rackscope", "agent", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.api_port = 0
        self.metrics_port = 0
        threading.Thread(target=self._drain, daemon=True).start()

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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _sim_agent_args(node: str, tmp: Path, host: str = "127.0.0.1", extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "--source",
        "sim",
        "--gpus",
        "2",
        "--gpu-model",
        "gb300",
        "--rack",
        "rt",
        "--node",
        node,
        "--metrics-port",
        "0",
        "--api-port",
        "0",
        "--api-host",
        host,
        "--results-dir",
        str(tmp / f"agent-{node}"),
        *extra,
    ]


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    procs = [AgentProcess(_sim_agent_args(f"n0{i}", tmp_path)) for i in (1, 2, 3)]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


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
    assert not list(out.rglob("*.tmp"))


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


def test_sigterm_cancels_the_runs_and_keeps_the_bundle(agents: list[AgentProcess], tmp_path: Path) -> None:
    import urllib.request

    out = tmp_path / "bundle"
    urls = [f"http://127.0.0.1:{a.api_port}" for a in agents]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rackscope", "rack", "run", "--agents", ",".join(urls), "--duration", "60",
         "--warmup", "0", "--run-id", "longrun", "--output", str(out), "--poll-interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not all((out / "nodes" / n / "run.json").exists() for n in ("n01", "n02", "n03")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.5)  # past the common start
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "what was collected is in" in err
    record = json.loads((out / "rack.json").read_text())
    assert record["state"] == "interrupted"
    assert record["summary"]["complete"] is False
    assert {n["status"] for n in record["nodes"]} == {"cancelled"}
    for url in urls:  # the agents were told: their runs stop instead of running on for a minute
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"{url}/v1/runs/longrun", timeout=10) as resp:
                status = json.loads(resp.read())["status"]
            if status == "cancelled" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == "cancelled"


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
                    _sim_agent_args(f"h{k}", tmp_path, host=ns.ip, extra=("--api-token", "s3cret")),
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
