"""End to end on 127.0.0.1: ``rackscope serve-sim`` serves the engine's state under vLLM's names,
a ``rackscope agent --engine-metrics`` scrapes it, ``rackscope run --engine openai`` loads it,
and at the end of the run the server-counted output tokens the agent exports agree with the
client-counted ones in the run record (within 1 %). When the server goes away, the agent stops
exporting its numbers and says so."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agent.conftest import AgentProcess, spawn_agent
from tests.helpers import stop_process, wait_for

pytestmark = pytest.mark.slow

MODEL = "llama2-70b"
REQUESTS = 40
OUTPUT_LEN = 64
LISTENING = re.compile(r"listening on (http://\S+)")


def samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(url, timeout=5).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def engine_series(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
                  **labels: str) -> float | None:
    for (sample, found), value in metrics.items():
        if sample == name and set(labels.items()) <= found:
            return value
    return None


@pytest.fixture
def serve_sim() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rackscope", "serve-sim", "--gpu-model", "h100", "--gpus", "1", "--port", "0",
         "--model", MODEL],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = LISTENING.search(line)
    assert match, f"serve-sim did not start: {line!r}"
    try:
        yield proc, match.group(1)
    finally:
        stop_process(proc)


@pytest.fixture
def agent(serve_sim: tuple[subprocess.Popen[str], str]) -> Iterator[AgentProcess]:
    _, url = serve_sim
    agent = spawn_agent("--source", "sim", "--gpus", "1", "--gpu-model", "h100", "--rack", "r1", "--node", "n01",
                        "--metrics-port", "0", "--api-port", "0", "--interval", "0.2", "--engine-metrics", url)
    try:
        yield agent
    finally:
        stop_process(agent.proc)


def test_server_counted_tokens_agree_with_the_client(
    serve_sim: tuple[subprocess.Popen[str], str], agent: AgentProcess, tmp_path: Path
) -> None:
    server, url = serve_sim
    metrics = f"http://127.0.0.1:{agent.metrics_port}/metrics"
    up = {"rack": "r1", "node": "n01", "format": "vllm"}
    wait_for("the agent reading the server's page",
             lambda: engine_series(samples(metrics), "rackscope_engine_up", **up) == 1)
    record = tmp_path / "run.json"
    run = subprocess.run(
        [sys.executable, "-m", "rackscope", "run", "--engine", "openai", "--url", url, "--model", MODEL,
         "--scenario", "concurrency", "--concurrency", "8", "--requests", str(REQUESTS), "--warmup", "0",
         "--output-len", str(OUTPUT_LEN), "--rack", "r1", "--node", "n01", "--output", str(record)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    client = json.loads(record.read_text())["summary"]["output_tokens"]
    assert client == REQUESTS * OUTPUT_LEN

    output = {"rack": "r1", "node": "n01", "model": MODEL, "gen_ai_token_type": "output"}
    server_counted = wait_for(
        "the agent's server-counted tokens to catch up with the end of the run",
        lambda: (v := engine_series(samples(metrics), "rackscope_engine_tokens_total", **output)) and v >= client and v,
        timeout_s=10,
    )
    assert server_counted == pytest.approx(client, rel=0.01)
    now = samples(metrics)
    ident = {"rack": "r1", "node": "n01", "model": MODEL}
    assert engine_series(now, "rackscope_engine_requests", **ident, state="waiting") == 0
    assert engine_series(now, "rackscope_engine_requests", **ident, state="running") == 0
    assert engine_series(now, "rackscope_engine_kv_cache_usage_ratio", **ident) == 0
    assert engine_series(now, "rackscope_engine_tokens_total", **ident, gen_ai_token_type="input") > 0  # type: ignore[operator]

    # The server's own latency histograms, exported with its buckets and counts as it has them.
    page = samples(f"{url}/metrics")
    ttft = "rackscope_engine_time_to_first_token_seconds"
    wait_for("the agent's copy of the server's TTFT histogram to catch up",
             lambda: engine_series(samples(metrics), f"{ttft}_count", **ident)
             == engine_series(page, "vllm:time_to_first_token_seconds_count"))
    now = samples(metrics)
    assert engine_series(now, f"{ttft}_count", **ident) == REQUESTS
    server_buckets = {dict(labels)["le"]: v for (name, labels), v in page.items()
                      if name == "vllm:time_to_first_token_seconds_bucket"}
    agent_buckets = {dict(labels)["le"]: v for (name, labels), v in now.items()
                     if name == f"{ttft}_bucket" and set(ident.items()) <= labels}
    assert len(server_buckets) > 5
    assert {float(le): v for le, v in agent_buckets.items()} == {float(le): v for le, v in server_buckets.items()}
    assert engine_series(now, f"{ttft}_sum", **ident) == pytest.approx(
        engine_series(page, "vllm:time_to_first_token_seconds_sum"))
    itl_count = engine_series(now, "rackscope_engine_inter_token_latency_seconds_count", **ident)
    assert itl_count is not None and itl_count > 0
    assert itl_count == engine_series(page, "vllm:inter_token_latency_seconds_count")

    # The server goes away: its numbers leave with it, and the agent says it cannot read it.
    stop_process(server)
    wait_for("the engine marked down", lambda: engine_series(samples(metrics), "rackscope_engine_up", **up) == 0)
    after = samples(metrics)
    assert engine_series(after, "rackscope_engine_tokens_total", **output) is None
    assert engine_series(after, "rackscope_engine_requests", **ident, state="waiting") is None
    assert engine_series(after, f"{ttft}_count", **ident) is None
    assert agent.proc.poll() is None


def test_a_hosted_openai_run_has_its_server_read_while_it_runs(serve_sim: tuple[subprocess.Popen[str], str]) -> None:
    _, url = serve_sim
    agent = spawn_agent("--source", "sim", "--gpus", "1", "--gpu-model", "h100", "--rack", "r1", "--node", "n01",
                        "--metrics-port", "0", "--api-port", "0", "--interval", "0.2")
    try:
        metrics = f"http://127.0.0.1:{agent.metrics_port}/metrics"
        api = f"http://127.0.0.1:{agent.api_port}"
        assert not [k for k in samples(metrics) if k[0].startswith("rackscope_engine_")]
        body = {"engine": "openai", "url": url, "model": MODEL, "scenario": "concurrency", "concurrency": 4,
                "duration_s": 4, "output_len": OUTPUT_LEN, "warmup_auto": False}
        answer = httpx.post(f"{api}/v1/runs", json=body, timeout=10)
        assert answer.status_code == 201, answer.text
        run_id = answer.json()["run_id"]
        output = {"rack": "r1", "node": "n01", "model": MODEL, "gen_ai_token_type": "output"}
        wait_for("the run's server read by the agent",
                 lambda: (engine_series(samples(metrics), "rackscope_engine_tokens_total", **output) or 0) > 0)
        wait_for("the run to end", lambda: httpx.get(f"{api}/v1/runs/{run_id}", timeout=5).json()["status"]
                 not in ("pending", "running"), timeout_s=30)
        # The hosted run's record holds the server's view, as a `rackscope run` record does.
        record = httpx.get(f"{api}/v1/runs/{run_id}/record", timeout=10).json()
        server = record["server"]
        assert server["available"] is True and server["format"] == "vllm", server
        truth = server["truth_check"]
        assert truth["server_output_tokens"] > 0
        assert abs(truth["relative_difference"]) < 0.01, truth
        wait_for("nothing exported once the run ended",
                 lambda: not [k for k in samples(metrics) if k[0].startswith("rackscope_engine_")])
    finally:
        stop_process(agent.proc)
