"""``rackscope run`` reading a hostile metrics page while it loads a healthy server.

The run's numbers come from its client; the server's page only adds a view beside them. A page
that never answers, trickles, floods, inflates, lies about its histograms or is not there at all
must leave the run as it would have been: complete, every token counted, in about the same time
and memory, with one log line and a record that says the view was unavailable and why.

The inference server is a real ``rackscope serve-sim`` process; the page is served by a raw
socket server in this process; the run is a real process under the hostile-test memory limit.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import rackscope_command, run_limited, stop_process
from tests.rackscope.engine_metrics.server import PageServer, gzip_bomb
from tests.runner.streaming_server import Behaviour, StreamingServer

pytestmark = pytest.mark.slow

REQUESTS = 16
TOKENS = 32
# Reads of the page are bounded at 1 s each; a hostile page costs the run one at its start and
# at most one more at its end, plus scheduling noise on a busy machine.
SLACK_S = 4.0


@dataclass
class Run:
    returncode: int
    elapsed_s: float
    peak_rss_bytes: int
    output: str
    record: dict[str, Any]


class ServeSim:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            rackscope_command("--log-level", "warning", "serve-sim", "--gpu-model", "gb300", "--port", "0"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert self.proc.stdout is not None
        match = re.search(r"listening on (http://\S+)", self.proc.stdout.readline())
        assert match, "serve-sim did not start"
        self.url = match.group(1)


@pytest.fixture(scope="module")
def serve_sim() -> Iterator[ServeSim]:
    server = ServeSim()
    yield server
    stop_process(server.proc)
    assert server.proc.stdout is not None
    server.proc.stdout.close()


def run(where: Path, name: str, url: str, *extra: str) -> Run:
    out = where / f"{name}.json"
    argv = rackscope_command(
        "run", "--engine", "openai", "--url", url, "--scenario", "concurrency", "--concurrency", "8",
        "--requests", str(REQUESTS), "--output-len", str(TOKENS), "--input-len", "64", "--output", str(out), *extra,
    )
    log_path = where / f"{name}.log"
    returncode, elapsed, peak_rss = run_limited(argv, where, log_path)
    output = log_path.read_text()
    assert out.exists(), output
    return Run(returncode, elapsed, peak_rss, output, json.loads(out.read_text()))


@pytest.fixture(scope="module")
def calm(serve_sim: ServeSim, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The same run reading no page: the reference."""
    return run(tmp_path_factory.mktemp("calm"), "calm", serve_sim.url, "--no-engine-metrics")


def assert_unharmed(hostile: Run, calm: Run) -> dict[str, Any]:
    assert hostile.returncode == 0, hostile.output
    summary = hostile.record["summary"]
    assert summary["complete"] is True
    assert (summary["requests_completed"], summary["output_tokens"]) == (REQUESTS, REQUESTS * TOKENS)
    assert hostile.elapsed_s < calm.elapsed_s + SLACK_S, (hostile.elapsed_s, calm.elapsed_s)
    # The page is read into at most 8 MiB (decoded) at a time, and nothing of a failed read is kept.
    growth = hostile.peak_rss_bytes - calm.peak_rss_bytes
    peaks = f"peak RSS {hostile.peak_rss_bytes / 2**20:.0f} MiB, calm {calm.peak_rss_bytes / 2**20:.0f} MiB"
    assert growth < 48 * 2**20, peaks
    server: dict[str, Any] = hostile.record["server"]
    return server


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("silent", "within"), ("trickle", "within"), ("flood", "more than"), ("bomb", "more than"),
     ("status", "answered 500"), ("garbage", "none of vllm, sglang, trtllm|not Prometheus text")],
)
def test_a_hostile_page_leaves_the_run_as_it_was(mode: str, reason: str, serve_sim: ServeSim, calm: Run,
                                                 tmp_path: Path) -> None:
    gzip_bomb()  # built before any clock starts
    page = PageServer(b"<html>502 Bad Gateway</html>\n")
    page.mode, page.status = ("page" if mode == "garbage" else mode), 500
    try:
        hostile = run(tmp_path, mode, serve_sim.url, "--engine-metrics", page.url)
    finally:
        page.close()
    server = assert_unharmed(hostile, calm)
    assert server["available"] is False
    assert re.search(reason, server["error"]), server["error"]
    assert server["url"] == page.url
    assert server["failures"] == server["scrapes"] >= 1  # every read that was not cut short by the end
    assert (server["output_tokens"], server["truth_check"], server["ttft_s"]) == (None, None, None)
    # Said once, however many reads failed.
    assert hostile.output.count("engine metrics unreadable") == 1, hostile.output
    assert "server view      unavailable:" in hostile.output


def test_a_page_with_lying_histograms_is_refused_not_read(serve_sim: ServeSim, calm: Run, tmp_path: Path) -> None:
    # A vLLM page whose TTFT buckets go down: no latency can be read from it, and no count either.
    body = "\n".join([
        "# TYPE vllm:generation_tokens counter", 'vllm:generation_tokens_total{model_name="llama2-70b"} 5.0',
        "# TYPE vllm:time_to_first_token_seconds histogram",
        'vllm:time_to_first_token_seconds_bucket{model_name="llama2-70b",le="0.1"} 9.0',
        'vllm:time_to_first_token_seconds_bucket{model_name="llama2-70b",le="+Inf"} 3.0',
        'vllm:time_to_first_token_seconds_count{model_name="llama2-70b"} 3.0',
        'vllm:time_to_first_token_seconds_sum{model_name="llama2-70b"} 0.3', "",
    ]).encode()
    page = PageServer(body)
    try:
        hostile = run(tmp_path, "lying", serve_sim.url, "--engine-metrics", page.url)
    finally:
        page.close()
    server = assert_unharmed(hostile, calm)
    assert server["available"] is False
    assert "not cumulative" in server["error"]


def test_a_server_without_a_metrics_page_is_an_unavailable_view(tmp_path: Path) -> None:
    # An OpenAI-compatible server that answers /metrics with 404, read at its default page: the
    # server's origin + /metrics.
    with StreamingServer(Behaviour(models=["m"])) as server:
        reference = run(tmp_path, "nopage-calm", server.base_url, "--model", "m", "--no-engine-metrics")
        hostile = run(tmp_path, "nopage", server.base_url, "--model", "m")
        asked = [r.path for r in server.requests if r.method == "GET" and r.path != "/v1/models"]
    assert asked and set(asked) == {"/metrics"}
    server_view = assert_unharmed(hostile, reference)
    assert server_view["available"] is False
    assert server_view["url"] == f"{server.base_url}/metrics"
    assert "answered 404" in server_view["error"]
    assert reference.record["server"] is None
