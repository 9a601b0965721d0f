"""The server's own view of a run: the setting on every path, the ``server`` section computed from a
history of readings and the client's records (which stretch is compared, how window edges are
treated), its one-line description, and then real ``rackscope run`` processes against a real
``rackscope serve-sim`` process, whose own count must agree with the client's within 1 %."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rackscope.agent.run_models import RunBody
from rackscope.engine_metrics.formats import EngineFormat, Histogram, ModelReading, Reading
from rackscope.engine_metrics.history import ReadingHistory
from rackscope.errors import ConfigError
from rackscope.runner.config import RunConfig
from rackscope.runner.records import RequestRecord
from rackscope.runner.results.io import load_run
from rackscope.runner.results.window import Phase
from rackscope.runner.server_view import describe, page_url, server_section
from tests.helpers import rackscope_command, stop_process

URL = "http://127.0.0.1:8000"
BOUNDS = (0.05, 0.1, 0.5, math.inf)


# --- the setting ---------------------------------------------------------------------------------
def test_the_page_is_the_server_origin_unless_given_or_turned_off() -> None:
    base = {"engine": "openai", "url": "http://user:pw@10.0.0.5:8000/v1", "requests": 1}
    assert page_url(RunConfig.from_dict(base)) == "http://10.0.0.5:8000/metrics"
    given = RunConfig.from_dict({**base, "engine_metrics": "http://10.0.0.5:9400/prometheus/metrics"})
    assert page_url(given) == "http://10.0.0.5:9400/prometheus/metrics"
    assert page_url(RunConfig.from_dict({**base, "engine_metrics_off": True})) is None
    assert page_url(RunConfig.from_dict({"engine": "sim", "requests": 1})) is None


def test_the_setting_is_checked_and_recorded_redacted() -> None:
    base = {"engine": "openai", "url": URL, "requests": 1}
    config = RunConfig.from_dict({**base, "engine_metrics": "http://u:secret@10.0.0.5:9000/metrics?token=t"})
    recorded = config.to_dict()
    assert "secret" not in json.dumps(recorded) and "token=t" not in json.dumps(recorded)
    assert recorded["engine_metrics"].startswith("http://") and recorded["engine_metrics_off"] is False
    for bad, error in (
        ({**base, "engine_metrics": "file:///etc/passwd"}, "engine_metrics must be an http"),
        ({**base, "engine_metrics": URL + "/metrics", "engine_metrics_off": True}, "not both"),
        ({"engine": "sim", "requests": 1, "engine_metrics": URL + "/metrics"}, "openai engine only"),
        ({**base, "engine_metrics_off": "yes"}, "true or false"),
    ):
        with pytest.raises(ConfigError, match=error):
            RunConfig.from_dict(bad)


def test_the_api_refuses_a_page_url() -> None:
    # A URL from the network would let any API caller point the agent at any host and port.
    for key, value in (("engine_metrics", URL + "/metrics"), ("engine_metrics_off", True)):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            RunBody.model_validate({"engine": "openai", "url": URL, key: value})


# --- the section, from a history and records -------------------------------------------------------
def rec(rid: str, start: float, first: float, tokens: int, gap: float) -> RequestRecord:
    """A finished request whose tokens arrived ``gap`` apart from ``first``."""
    return RequestRecord(rid, start, first_token_s=first, end_s=first + gap * (tokens - 1), output_tokens=tokens,
                         ok=True, itl_s=[gap] * (tokens - 1))


def page(out: float, running: float, ttft: tuple[float, ...] = (0, 0, 0, 0)) -> Reading:
    return Reading(EngineFormat.VLLM, (ModelReading(
        "m", running=running, waiting=0.0, kv_cache_usage=running / 100, input_tokens=out * 2, output_tokens=out,
        ttft_s=Histogram(BOUNDS, ttft, 0.07 * ttft[-1], ttft[-1]),
    ),))


def history(*points: tuple[float, float, float]) -> ReadingHistory:
    h = ReadingHistory("m")
    for t, out, running in points:
        h.add(t, page(out, running))
    return h


def test_a_whole_window_is_compared_when_readings_just_outside_can_stand_for_its_edges() -> None:
    # Two requests, 10 tokens each, one a second apart from t=1.0; the window is [1, 10.5].
    records = [rec("a", 0.9, 1.0, 10, 1.0), rec("b", 1.0, 1.5, 10, 1.0)]
    phase = Phase(records, start_s=1.0, end_s=10.5)
    h = history((0.5, 100.0, 0.0), (3.2, 105.0, 2.0), (6.2, 111.0, 2.0), (11.0, 120.0, 0.0))
    cold = server_section(h, [phase], url=URL, cold_start=True, scrapes=4, failures=0, last_error=None)
    assert cold["available"] is True and cold["error"] is None
    assert cold["interval_s"] == pytest.approx(10.5)  # from the reading at 0.5 to the one at 11.0
    assert cold["coverage"] == 1.0
    assert (cold["output_tokens"], cold["input_tokens"]) == (20.0, 40.0)
    truth = cold["truth_check"]
    assert (truth["client_output_tokens"], truth["server_output_tokens"]) == (20.0, 20.0)
    assert truth["relative_difference"] == 0.0
    assert truth["client_output_tokens_per_s"] == pytest.approx(20 / 10.5)
    # Gauges: the readings inside the window only.
    assert cold["running_requests"] == {"mean": 2.0, "max": 2.0}
    assert cold["kv_cache_usage"] == {"mean": pytest.approx(0.02), "max": 0.02}
    assert (cold["format"], cold["model"], cold["samples"], cold["scrapes"]) == ("vllm", "m", 4, 4)


def test_with_a_warm_up_or_a_cut_end_only_readings_inside_the_window_are_compared() -> None:
    records = [rec("a", 0.9, 1.0, 10, 1.0), rec("b", 1.0, 1.5, 10, 1.0)]
    phase = Phase(records, start_s=1.0, end_s=10.5, stop_reason="duration")
    h = history((0.5, 100.0, 0.0), (3.2, 105.0, 2.0), (6.2, 111.0, 2.0), (11.0, 120.0, 0.0))
    warm = server_section(h, [phase], url=URL, cold_start=False, scrapes=4, failures=0, last_error=None)
    assert warm["interval_s"] == pytest.approx(3.0)  # 3.2 to 6.2
    assert warm["coverage"] == pytest.approx(3.0 / 9.5)
    truth = warm["truth_check"]
    # Tokens arrived at 3.5, 4.0, 4.5, 5.0, 5.5, 6.0 inside [3.2, 6.2]: six, against the server's six.
    assert truth["client_output_tokens"] == 6.0
    assert truth["server_output_tokens"] == 6.0
    # A client that lost a token stream shows as a negative difference (it counted less).
    lossy = [rec("a", 0.9, 1.0, 10, 1.0)]
    one = server_section(h, [Phase(lossy, 1.0, 10.5, stop_reason="duration")], url=URL, cold_start=False,
                         scrapes=4, failures=0, last_error=None)
    assert one["truth_check"]["relative_difference"] == pytest.approx((3 - 6) / 6)


def test_server_histograms_give_window_quantiles() -> None:
    h = ReadingHistory("m")
    h.add(0.0, page(0.0, 0.0, (5, 5, 5, 5)))  # before the run: counted already, not in the window
    h.add(5.0, page(10.0, 1.0, (5, 15, 45, 45)))
    h.add(9.0, page(20.0, 1.0, (5, 15, 45, 45)))
    phase = Phase([rec("a", 0.1, 0.2, 20, 0.45)], 0.0, 9.0)
    section = server_section(h, [phase], url=URL, cold_start=False, scrapes=3, failures=0, last_error=None)
    ttft = section["ttft_s"]
    assert ttft["count"] == 40
    assert ttft["mean"] == pytest.approx(0.07)
    # 10 in (0.05, 0.1], 30 in (0.1, 0.5]: the median at rank 20 is a third into the second bucket.
    assert ttft["p50"] == pytest.approx(0.1 + 0.4 * 10 / 30)
    assert ttft["p99"] == pytest.approx(0.1 + 0.4 * (39.6 - 10) / 30)
    assert section["itl_s"] is None  # the page had no ITL histogram: none, not zero


def test_a_page_never_read_is_an_unavailable_view_with_its_reason() -> None:
    section = server_section(ReadingHistory("m"), [Phase([], 0.0, 5.0)], url=URL + "/metrics", cold_start=True,
                             scrapes=6, failures=6, last_error="http://127.0.0.1:8000/metrics answered 404 Not Found")
    assert section["available"] is False
    assert section["error"].endswith("answered 404 Not Found")
    assert (section["scrapes"], section["failures"], section["truth_check"], section["output_tokens"]) == (
        6, 6, None, None)
    assert describe(section) == ["unavailable: http://127.0.0.1:8000/metrics answered 404 Not Found"]


def test_a_window_without_two_readings_says_so() -> None:
    h = history((5.0, 1.0, 1.0))
    section = server_section(h, [Phase([], 4.0, 6.0, stop_reason="duration")], url=URL, cold_start=False,
                             scrapes=1, failures=0, last_error=None)
    assert section["available"] is True and section["truth_check"] is None and section["interval_s"] is None
    assert "fewer than two readings" in section["error"]
    assert section["running_requests"] == {"mean": 1.0, "max": 1.0}


def test_describe_reads_a_section_from_a_file_as_untrusted() -> None:
    good = {"available": True, "format": "vllm", "samples": 12, "coverage": 0.9,
            "truth_check": {"client_output_tokens_per_s": 1000.0, "server_output_tokens_per_s": 995.0,
                            "relative_difference": 5 / 995},
            "ttft_s": {"p50": 0.05, "p99": 0.2}, "itl_s": {"p50": 0.017, "p99": 0.025},
            "running_requests": {"mean": 14.5, "max": 16}, "kv_cache_usage": {"mean": 0.1, "max": 0.2}}
    assert describe(good) == [
        "vllm, 12 readings covering 90 % of the window",
        "output tokens/s: server 995.0, client 1,000.0 (+0.50 %)",
        "TTFT p50/p99 50.0 / 200.0 ms; ITL p50/p99 17.0 / 25.0 ms (server buckets)",
        "running 14.5 (max 16.0), KV cache 10.0 % (max 20.0 %)",
    ]
    for hostile in (None, [], "x", {"available": True, "samples": "many", "truth_check": [1],
                                    "ttft_s": {"p50": "fast"}, "format": "\x1b[31mred" + "x" * 500},
                    {"available": "yes", "error": "line\nbreak"}):
        lines = describe(hostile)
        assert all(line.isprintable() and len(line) < 300 for line in lines)


# --- real processes: rackscope serve-sim and rackscope run -------------------------------------------
class ServeSim:
    """``rackscope serve-sim`` in a process of its own, on a free port."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            rackscope_command("--log-level", "warning", "serve-sim", "--gpu-model", "gb300", "--port", "0"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, f"serve-sim did not start: {line!r}"
        self.url = match.group(1)

    def close(self) -> None:
        stop_process(self.proc)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def serve_sim() -> Iterator[ServeSim]:
    server = ServeSim()
    yield server
    server.close()


def run(where: Path, name: str, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = where / f"{name}.json"
    done = subprocess.run(
        rackscope_command("run", "--engine", "openai", "--scenario", "concurrency", "--concurrency", "16",
                          "--input-len", "128", "--output", str(out), *args),
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done, load_run(out)


@pytest.mark.slow
def test_a_requests_bounded_run_agrees_with_the_server_exactly(tmp_path: Path, serve_sim: ServeSim) -> None:
    done, record = run(tmp_path, "req", "--url", serve_sim.url, "--requests", "48", "--output-len", "64")
    server = record["server"]
    assert server["available"] is True, server
    assert (server["format"], server["model"], server["failures"]) == ("vllm", "llama2-70b", 0)
    # Read before the first request and after the last: the whole window, every token on both sides.
    assert server["coverage"] == 1.0
    assert server["output_tokens"] == 48 * 64 == record["summary"]["output_tokens"]
    truth = server["truth_check"]
    assert truth["client_output_tokens"] == truth["server_output_tokens"] == 48 * 64
    assert abs(truth["relative_difference"]) < 0.01
    assert server["input_tokens"] == record["summary"]["input_tokens"]
    assert server["ttft_s"]["count"] == 48 and server["itl_s"]["count"] == 48 * 63
    # The server's ITL buckets hold the client's median token gap.
    client_itl = record["summary"]["itl_s"]["p50"]
    assert 0.5 * client_itl < server["itl_s"]["p50"] < 2 * client_itl
    assert 0 < server["running_requests"]["mean"] <= server["running_requests"]["max"] <= 16
    assert 0 < server["kv_cache_usage"]["max"] <= 1
    assert "server view      vllm," in done.stdout
    assert re.search(r"output tokens/s: server [\d,.]+, client [\d,.]+ \([+-]\d+\.\d\d %\)", done.stdout)
    # The report shows the same.
    report = subprocess.run(rackscope_command("report", str(tmp_path / "req.json")), capture_output=True, text=True,
                            timeout=120, check=False)
    assert report.returncode == 0, report.stderr
    markdown = (tmp_path / "req-report" / "report.md").read_text()
    assert "## Server view" in markdown and "output tokens/s: server" in markdown


@pytest.mark.slow
def test_a_duration_bounded_run_agrees_over_the_readings_inside_its_window(tmp_path: Path,
                                                                          serve_sim: ServeSim) -> None:
    _, record = run(tmp_path, "dur", "--url", serve_sim.url, "--duration", "4", "--output-len", "128")
    server = record["server"]
    truth = server["truth_check"]
    assert truth is not None, server
    # Requests cut at the window's edges count on both sides alike: only what arrived in between.
    assert abs(truth["relative_difference"]) < 0.01, truth
    assert 0.4 <= server["coverage"] <= 1.0
    assert truth["interval_s"] == pytest.approx(server["coverage"] * record["summary"]["duration_s"])


@pytest.mark.slow
def test_no_engine_metrics_reads_no_page(tmp_path: Path, serve_sim: ServeSim) -> None:
    before = time.monotonic()
    done, record = run(tmp_path, "off", "--url", serve_sim.url, "--requests", "16", "--output-len", "16",
                       "--no-engine-metrics")
    assert record["server"] is None and record["config"]["engine_metrics_off"] is True
    assert "server view" not in done.stdout
    assert time.monotonic() - before < 60


def test_a_bug_summing_up_the_view_costs_the_view_not_the_record(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from rackscope.runner import server_view

    watch = server_view.ServerWatch(URL + "/metrics", model="m", clock=time.monotonic)

    def broken(*_args: object, **_kwargs: object) -> dict[str, Any]:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(server_view, "server_section", broken)
    section = watch.section([Phase([], 0.0, 1.0)], cold_start=True)
    assert section["available"] is False and "internal error" in section["error"]
    assert "summing up the server's view of the run failed" in caplog.text
