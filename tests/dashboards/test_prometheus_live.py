"""Dashboards and rules against a real Prometheus scraping real simulated agents.

Debian's Prometheus runs on 127.0.0.1 with a temporary TSDB, scraping and evaluating every
second, loaded with the fast variant of the rules (``RuleParams.fast()``: the same rules with
second-scale windows and ``for:`` durations). Four agents (``rackscope agent --source sim
--gpu-model gb300 --gpus 4``) form rack r1, each running an unbounded offline benchmark
started through its control API (``POST /v1/runs``) with OpenOrca-like lognormal output
lengths. (``--workload offline`` issues fixed-length requests, which finish in lockstep: tokens
arrive in ~20 s waves that second-scale windows read as stragglers and regressions; the
production 1 m windows and 5 m ``for:`` ride them out.) The test checks that

- no alert fires while the rack is healthy;
- the rack tokens/s recording rule is the sum of the node ones (and those of the GPU ones);
- tokens per joule equals the increase of the output-token counters over the increase of the
  energy counters (raw samples of the rule's own window), within 2 %;
- a power cap injected on one node through its control API (POST /v1/faults) makes the
  straggler alert fire (and the power-throttle alert);
- a degraded NVLink injected on one GPU of that node fires the NVLink-errors alert for that GPU
  only, through the error types the real sources export;
- every query of every dashboard panel, template variables set to real values, returns data.

The inference-server panels read what an agent scrapes from a server's own metrics page: one
idle ``rackscope serve-sim`` (vLLM's names) is scraped by n01 (``--engine-metrics``), so those
series exist (its queue and token counters stay at zero: the rack's load runs on the agents'
simulated engines, not through it).
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from rackscope import contract
from rackscope.dashboards import names, rules
from tests import helpers
from tests.dashboards import grafana_json as gj

PROMETHEUS = "/usr/bin/prometheus"
NODES = ("n01", "n02", "n03", "n04")
FAULTY_NODE = "n02"
ENGINE_NODE = "n01"  # the node whose agent scrapes an inference server's metrics page
RACK = "r1"
# The expected rack: 4 nodes x 4 GB300 GPUs at the published ~15,291 tokens/s each.
BASELINE_TPS = 4 * 4 * 1_100_948.3 / 72
BASELINE_TPJ = 11.0
HEALTHY_WINDOW_S = 20
# An offline run until stopped (no request or time bound), MLPerf's Llama2-70B shape with
# output lengths spread like OpenOrca's.
WORKLOAD = {"engine": "sim", "scenario": "offline", "length_dist": "lognormal", "length_spread": 0.5}
SCRAPE_INTERVAL = "1s"

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.slow,  # one real Prometheus and a simulated rack, about a minute
]


# Prometheus answers queries, not events: twice a second is often enough.
wait_for = functools.partial(helpers.wait_for, interval_s=0.5)
free_port = helpers.free_port


@dataclass
class Agent:
    node: str
    process: subprocess.Popen[bytes]
    log: Path
    metrics_port: int = 0
    api_port: int = 0


@dataclass
class Rack:
    prom: str  # base URL
    client: httpx.Client
    agents: dict[str, Agent]
    started_at: float
    healthy_firing: list[dict[str, Any]] = field(default_factory=list)
    healthy_pending: list[dict[str, Any]] = field(default_factory=list)
    counter_tpj: float = 0.0
    rule_tpj: float = 0.0
    fault_response: dict[str, Any] = field(default_factory=dict)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        r = self.client.get(f"{self.prom}/api/v1/query", params=params)
        assert r.status_code == 200, f"{expr}: {r.text}"
        result: list[dict[str, Any]] = r.json()["data"]["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        r = self.client.get(f"{self.prom}/api/v1/query_range",
                            params={"query": expr, "start": start, "end": end, "step": step})
        assert r.status_code == 200, f"{expr}: {r.text}"
        result: list[dict[str, Any]] = r.json()["data"]["result"]
        return result

    def value(self, expr: str, at: float | None = None) -> float:
        (sample,) = self.query(expr, at)
        return float(sample["value"][1])

    def alerts(self, state: str) -> list[dict[str, Any]]:
        r = self.client.get(f"{self.prom}/api/v1/alerts")
        return [a for a in r.json()["data"]["alerts"] if a["state"] == state]


def start_serve_sim(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """An idle ``rackscope serve-sim``; returns it and its URL."""
    log = tmp / "serve-sim.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "rackscope", "serve-sim", "--gpu-model", "h100",
                                    "--gpus", "1", "--port", "0"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp)

    def listening() -> re.Match[str] | None:
        if process.poll() is not None:
            raise AssertionError(f"serve-sim exited: {log.read_text()[-3000:]}")
        return re.search(r"listening on (http://\S+)", log.read_text())

    return process, wait_for("serve-sim", listening, timeout_s=30).group(1)


def start_agent(node: str, tmp: Path, *extra: str) -> Agent:
    log = tmp / f"agent-{node}.log"
    cmd = [sys.executable, "-m", "rackscope", "agent", "--source", "sim", "--gpu-model", "gb300", "--gpus", "4",
           "--rack", RACK, "--node", node, "--metrics-port", "0", "--api-port", "0",
           "--results-dir", str(tmp / f"results-{node}"), *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RACKSCOPE_", "OTEL_"))}
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    return Agent(node, process, log)


def wait_agent_ready(agent: Agent) -> None:
    def ready() -> re.Match[str] | None:
        if agent.process.poll() is not None:
            raise AssertionError(f"agent {agent.node} exited: {agent.log.read_text()[-3000:]}")
        return re.search(r"ready metrics_port=(\d+) api_port=(\d+)", agent.log.read_text())

    match = wait_for(f"agent {agent.node}", ready, timeout_s=60)
    agent.metrics_port, agent.api_port = int(match.group(1)), int(match.group(2))


def write_config(tmp: Path, agents: dict[str, Agent]) -> Path:
    fast = rules.rule_groups(rules.RuleParams.fast())
    baselines = rules.baseline_groups({RACK: (BASELINE_TPS, BASELINE_TPJ)})
    rule_file = tmp / "rules.yml"
    rule_file.write_text(rules.to_yaml({"groups": fast["groups"] + baselines["groups"]}))
    targets = ", ".join(f'"127.0.0.1:{a.metrics_port}"' for a in agents.values())
    config = tmp / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n"
        f"rule_files: [\"{rule_file}\"]\n"
        f"scrape_configs:\n  - job_name: rackscope-agents\n    static_configs:\n      - targets: [{targets}]\n"
    )
    return config


def tokens_per_joule(r: Rack) -> tuple[float, float]:
    """(output tokens / energy from the raw counter samples, the recording rule) over the very
    window the rule evaluated: the rule's own timestamp, its rate window."""
    selector = f'{names.RACK_TPJ}{{rack="{RACK}"}}'
    at = r.value(f"timestamp({selector})")  # when the rule last evaluated
    rule_value = r.value(selector, at)
    window = rules.RuleParams.fast().rate_window
    increase = {}
    for metric, selector in ((names.TOKENS, f'{{rack="{RACK}", {names.OUTPUT_TOKENS}}}'),
                             (names.ENERGY, f'{{rack="{RACK}"}}')):
        samples = r.query(f"{metric}{selector}[{window}]", at)
        assert len(samples) == len(NODES) * 4, metric  # one series per GPU
        increase[metric] = sum(float(s["values"][-1][1]) - float(s["values"][0][1]) for s in samples)
    return increase[names.TOKENS] / increase[names.ENERGY], rule_value


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def rack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rack]:
    tmp = tmp_path_factory.mktemp("live")
    server, server_url = start_serve_sim(tmp)
    agents = {node: start_agent(node, tmp, *(("--engine-metrics", server_url) if node == ENGINE_NODE else ()))
              for node in NODES}
    prometheus: subprocess.Popen[bytes] | None = None
    client = httpx.Client(timeout=10)
    try:
        for agent in agents.values():
            wait_agent_ready(agent)
            answer = client.post(f"http://127.0.0.1:{agent.api_port}/v1/runs", json=WORKLOAD)
            assert answer.status_code == 201, answer.text
        config = write_config(tmp, agents)
        port = free_port()
        with (tmp / "prometheus.log").open("wb") as out:
            prometheus = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"

        def prometheus_ready() -> bool:
            assert prometheus is not None
            assert prometheus.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                return client.get(f"{url}/-/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_for("Prometheus ready", prometheus_ready, timeout_s=30)
        r = Rack(url, client, agents, started_at=time.time())
        wait_for("every node's tokens/s recorded",
                 lambda: {s["metric"]["node"] for s in r.query(f"{names.NODE_TPS} > 0")} == set(NODES),
                 timeout_s=60)
        wait_for("tokens per joule recorded", lambda: r.query(f"{names.RACK_TPJ} > 0"), timeout_s=30)
        # Warm-up: requests only count when they finish, so each node ramps up over its first
        # ~20 s of requests. The rack is healthy, and steady, once it delivers 90 % of what 16
        # GB300s should and every node is within 5 % of the median, three times in a row.
        steady = [0]

        def warmed_up() -> bool:
            rack_tps = r.query(f'{names.RACK_TPS}{{rack="{RACK}"}}')
            spread = r.query(f'min({names.NODE_TPS}) / min({names.RACK_NODE_MEDIAN_TPS})')
            ok = (bool(rack_tps) and float(rack_tps[0]["value"][1]) >= 0.9 * BASELINE_TPS
                  and bool(spread) and float(spread[0]["value"][1]) >= 0.95)
            steady[0] = steady[0] + 1 if ok else 0
            return steady[0] >= 3

        wait_for("the rack at steady throughput", warmed_up, timeout_s=90, interval_s=1)
        # Healthy phase: watch alerts for a while.
        deadline = time.time() + HEALTHY_WINDOW_S
        while time.time() < deadline:
            r.healthy_firing += r.alerts("firing")
            r.healthy_pending += r.alerts("pending")
            time.sleep(1)
        r.counter_tpj, r.rule_tpj = tokens_per_joule(r)
        # Fault: cap every GPU of one node (default cap: 60 % of the 1,400 W limit).
        faulty = agents[FAULTY_NODE]
        answer = client.post(f"http://127.0.0.1:{faulty.api_port}/v1/faults", json={"fault": "power-cap"})
        assert answer.status_code == 200, answer.text
        r.fault_response = answer.json()
        wait_for("RackscopeNodeStraggler firing",
                 lambda: [a for a in r.alerts("firing") if a["labels"]["alertname"] == "RackscopeNodeStraggler"],
                 timeout_s=45)
        yield r
    finally:
        client.close()
        if prometheus is not None:
            stop(prometheus)
        for agent in agents.values():
            stop(agent.process)
        stop(server)
        shutil.rmtree(tmp / "tsdb", ignore_errors=True)


@pytest.mark.slow
def test_no_alert_fires_on_a_healthy_rack(rack: Rack) -> None:
    assert rack.healthy_firing == []
    assert rack.healthy_pending == []


def test_rack_tokens_per_second_is_the_sum_of_the_nodes(rack: Rack) -> None:
    at = time.time() - 2
    racks = rack.value(f'{names.RACK_TPS}{{rack="{RACK}"}}', at)
    nodes = rack.value(f'sum({names.NODE_TPS}{{rack="{RACK}"}})', at)
    gpus = rack.value(f'sum({names.GPU_TPS}{{rack="{RACK}"}})', at)
    assert racks > 0
    assert racks == pytest.approx(nodes, rel=1e-9)
    assert racks == pytest.approx(gpus, rel=1e-9)
    assert len(rack.query(f'{names.NODE_TPS}{{rack="{RACK}"}}', at)) == len(NODES)
    assert len(rack.query(f'{names.GPU_TPS}{{rack="{RACK}"}}', at)) == 4 * len(NODES)


def test_tokens_per_joule_is_tokens_over_the_energy_counters_increase(rack: Rack) -> None:
    assert 5 < rack.counter_tpj < 30  # a GB300 at ~15k tokens/s and ~1.3 kW: about 11
    assert rack.rule_tpj == pytest.approx(rack.counter_tpj, rel=0.02)


def test_power_cap_makes_the_capped_node_a_straggler(rack: Rack) -> None:
    firing = rack.alerts("firing")
    stragglers = [a["labels"] for a in firing if a["labels"]["alertname"] == "RackscopeNodeStraggler"]
    assert stragglers == [{"alertname": "RackscopeNodeStraggler", "rack": RACK, "node": FAULTY_NODE,
                           "severity": "warning"}]
    ratio = rack.value(f'{names.NODE_TPS}{{node="{FAULTY_NODE}"}} / on (rack) group_left () '
                       f"{names.RACK_NODE_MEDIAN_TPS}")
    assert ratio < rules.RuleParams().straggler_ratio
    wait_for("RackscopeGpuPowerThrottled firing on the capped node", lambda: {
        a["labels"]["gpu"] for a in rack.alerts("firing")
        if a["labels"]["alertname"] == "RackscopeGpuPowerThrottled" and a["labels"]["node"] == FAULTY_NODE
    } == {"0", "1", "2", "3"}, timeout_s=20)
    others = {a["labels"].get("node") for a in rack.alerts("firing")} - {FAULTY_NODE}
    assert others == set(), f"alerts on healthy nodes: {others}"


def _variable_values(rack: Rack, dashboard: dict[str, Any]) -> dict[str, str]:
    """Each query variable resolved in order through Prometheus (as Grafana would), then set the
    way Grafana interpolates it: multi/All variables as a regex of every value, single ones as
    the first value."""
    now = time.time()
    values = {**gj.builtin_values("4s", f"{round(now - rack.started_at)}s", "1s"), "datasource": "prometheus"}
    for name, var in gj.variables(dashboard).items():
        if var["type"] != "query":
            continue
        selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]).groups()  # type: ignore[union-attr]
        r = rack.client.get(f"{rack.prom}/api/v1/series",
                            params={"match[]": gj.substitute(selector, values), "start": rack.started_at})
        found = sorted({s[label] for s in r.json()["data"] if label in s})
        assert found, f"variable {name}: no values for {var['query']}"
        if name == "baseline_run":
            found = found[1:] or found  # compare two different runs when there are two
        values[name] = f"({'|'.join(found)})" if var.get("multi") or var.get("includeAll") else found[0]
    return values


def _has_data(result: list[dict[str, Any]]) -> bool:
    points = [s["value"] for s in result if "value" in s] + [v for s in result for v in s.get("values", [])]
    return any(math.isfinite(float(v[1])) for v in points)


@pytest.mark.slow
def test_every_dashboard_query_returns_data(rack: Rack) -> None:
    empty = []
    checked = 0
    for name, dashboard in gj.dashboards().items():
        values = _variable_values(rack, dashboard)
        end = time.time()
        for target in gj.targets(name, dashboard):
            expr = gj.substitute(target.expr, values)
            result = rack.query(expr, end) if target.instant else rack.query_range(expr, rack.started_at, end)
            checked += 1
            if not _has_data(result):
                empty.append(f"{name} / {target.panel} / {target.ref_id}: {expr}")
        annotations = dict(gj.annotation_exprs(dashboard))
        if "Run started" in annotations:
            expr = gj.substitute(annotations["Run started"], values)
            assert _has_data(rack.query_range(expr, rack.started_at, end, step="15s")), expr
            rack.query_range(gj.substitute(annotations["Run ended"], values), rack.started_at, end, step="15s")
    assert checked > 60
    assert empty == [], "panels without data:\n" + "\n".join(empty)


def test_renamed_histograms_are_recorded_under_their_old_names(rack: Rack) -> None:
    """The agents' latency histograms (aggregated in the agent, scraped from /metrics) carry the
    GenAI attributes, and the compatibility rules give the old series names the same values."""
    for old, metric in contract.RENAMED_HISTOGRAMS:
        old_count, new_count = f"{old}_count", f"{metric.prom_name}_count"
        at = rack.value(f"max(timestamp({old_count}))")  # the rules' last evaluation
        copied = {_labels(s): float(s["value"][1]) for s in rack.query(old_count, at)}
        # What the rule read: a sample of the new series from just before it ran (a scrape that
        # started before the evaluation may have landed after it, hence a few recent samples).
        recent = {_labels(s): {float(v) for _, v in s["values"]} for s in rack.query(f"{new_count}[5s]", at)}
        assert set(copied) == set(recent)
        assert {node for labels in copied for k, node in labels if k == "node"} == set(NODES)
        assert all(value in recent[labels] for labels, value in copied.items())
        assert all(v > 0 for v in copied.values())
        for labels in copied:
            label = dict(labels)
            assert label["gen_ai_operation_name"] == "text_completion"
            assert label["gen_ai_provider_name"] == "rackscope.sim"
            assert label["gen_ai_request_model"] == label["model"]


def _labels(sample: dict[str, Any]) -> frozenset[tuple[str, str]]:
    return frozenset((k, v) for k, v in sample["metric"].items() if k != "__name__")


NVLINK_GPU = "2"  # the GPU of FAULTY_NODE whose NVLink is degraded last, by the test below


def test_a_degraded_nvlink_fires_the_nvlink_alert_for_that_gpu_only(rack: Rack) -> None:
    # On the node already capped, so the slower links make no new straggler elsewhere.
    faulty = rack.agents[FAULTY_NODE]
    answer = rack.client.post(f"http://127.0.0.1:{faulty.api_port}/v1/faults",
                              json={"fault": "nvlink-degraded", "gpu": int(NVLINK_GPU)})
    assert answer.status_code == 200, answer.text

    def nvlink_alerts() -> list[dict[str, str]]:
        return [a["labels"] for a in rack.alerts("firing") if a["labels"]["alertname"] == "RackscopeNvlinkErrors"]

    firing = wait_for("RackscopeNvlinkErrors firing", nvlink_alerts, timeout_s=30)
    assert firing == [{"alertname": "RackscopeNvlinkErrors", "rack": RACK, "node": FAULTY_NODE, "gpu": NVLINK_GPU,
                       "severity": "warning"}]
    # The error types the simulated fault raises are those the real sources export (recovery, the
    # rarest, may take a few seconds to show an increase).
    def growing() -> list[dict[str, Any]]:
        return rack.query(f"increase({names.ERRORS}{{{names.NVLINK_ERRORS}}}[10s]) > 0")

    wait_for("every NVLink error type growing",
             lambda: {s["metric"][names.ERROR_TYPE] for s in growing()} == {"crc", "replay", "recovery"},
             timeout_s=20)
    assert {(s["metric"]["node"], s["metric"]["gpu"]) for s in growing()} == {(FAULTY_NODE, NVLINK_GPU)}
