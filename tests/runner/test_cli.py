"""``rackscope run`` as a user runs it: real subprocesses, real servers on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rackscope.cli import build_parser
from rackscope.errors import ConfigError
from rackscope.runner.cli import config_from_args, parse_seconds, parse_warmup
from rackscope.runner.results.io import load_requests, load_run
from rackscope.simgpu import profile
from tests.helpers import free_port, wait_for

RACKSCOPE = [sys.executable, "-m", "rackscope"]


def rackscope(*args: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RACKSCOPE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


# --- flags ------------------------------------------------------------------------------------
def test_parse_seconds_and_warmup() -> None:
    assert parse_seconds("10") == 10.0
    assert parse_seconds("450ms") == pytest.approx(0.45)
    assert parse_seconds("2s") == 2.0
    assert parse_seconds("5m") == 300.0
    with pytest.raises(argparse.ArgumentTypeError):
        parse_seconds("soon")
    assert parse_warmup("auto") == ("auto", 0.0)
    assert parse_warmup("0") == ("none", 0.0)
    assert parse_warmup("20") == ("requests", 20.0)
    assert parse_warmup("5s") == ("seconds", 5.0)
    with pytest.raises(argparse.ArgumentTypeError, match="--warmup"):
        parse_warmup("lots")


def test_flags_to_config() -> None:
    cfg = config_from_args(parse(
        "--engine", "openai", "--url", "http://127.0.0.1:8000", "--model", "llama2-70b", "--scenario", "server",
        "--rate", "12.5", "--preset", "interactive", "--tpot-limit", "50ms", "--requests", "200", "--warmup", "10",
        "--api", "chat", "--seed", "3", "--node", "n07", "--rack", "r2",
    ), env={"OPENAI_API_KEY": "sk-test"})
    assert (cfg.engine, cfg.url, cfg.model, cfg.api, cfg.api_key) == (
        "openai", "http://127.0.0.1:8000", "llama2-70b", "chat", "sk-test")
    assert (cfg.scenario, cfg.rate, cfg.requests, cfg.warmup_requests, cfg.seed) == ("server", 12.5, 200, 10, 3)
    assert (cfg.limits().ttft_s, cfg.limits().tpot_s) == (0.45, 0.05)  # type: ignore[union-attr]
    assert (cfg.rack, cfg.node) == ("r2", "n07")
    sim = config_from_args(parse("--engine", "sim", "--scenario", "sweep", "--sweep", "1,8,64", "--duration", "5"))
    assert (sim.gpus, sim.gpu_model, sim.model, sim.sweep) == (4, "gb300", "llama2-70b", (1.0, 8.0, 64.0))
    assert config_from_args(parse("--engine", "openai", "--url", "http://x:1", "--requests", "1"), env={}).model == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engine", "sim"], "say how long to run"),
        (["--engine", "hf", "--requests", "3"], "needs --model"),
        (["--engine", "openai", "--requests", "3"], "needs a server URL"),
        (["--scenario", "server", "--requests", "3"], "needs a target rate"),
        (["--engine", "openai", "--url", "http://x:1", "--virtual-clock", "--requests", "3"], "sim only"),
        (["--workers", "2", "--requests", "3"], "needs the openai engine"),
    ],
)
def test_bad_flag_combinations(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_args(parse(*argv), env={})


@pytest.mark.slow
def test_bad_flags_exit_2(tmp_path: Path) -> None:
    done = rackscope("run", "--engine", "sim", "--scenario", "concurrency", "--requests", "5", cwd=tmp_path)
    assert done.returncode == 2
    assert "needs concurrency" in done.stderr
    done = rackscope("run", "--warmup", "lots", "--requests", "5", cwd=tmp_path)
    assert done.returncode == 2
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency", "100000000"], "argument --concurrency: concurrency must be at most 16,384"),
        (["--duration", "8d"], "argument --duration: duration_s must be at most 604,800 s"),
        (["--request-deadline", "0"], "argument --request-deadline: request_deadline_s must be positive"),
        (["--run-id", "../../x"], "argument --run-id: run_id must be 1-128 letters"),
        (["--node", "a b"], "argument --node"),
        (["--url", "file:///etc/passwd", "--engine", "openai"], "argument --url"),
        (["--sweep", ",".join(["1"] * 65), "--scenario", "sweep"], "at most 64 numbers"),
        (["--seed", "-1"], "seed must be at least 0"),
        (["--input-len", "2000000"], "at most 1,048,576 tokens"),
    ],
)
def test_flags_beyond_their_bounds_exit_2_naming_the_flag(tmp_path: Path, argv: list[str], message: str) -> None:
    done = rackscope("run", "--requests", "1", *argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_request_deadline_is_a_duration_and_goes_into_the_record() -> None:
    cfg = config_from_args(parse("--requests", "1", "--request-deadline", "10m", "--request-timeout", "450ms"))
    assert (cfg.request_deadline_s, cfg.request_timeout_s) == (600.0, pytest.approx(0.45))
    assert cfg.to_dict()["request_deadline_s"] == 600.0
    assert config_from_args(parse("--requests", "1")).request_deadline_s == 1800.0


def test_url_credentials_are_not_printed(tmp_path: Path) -> None:
    url = f"http://alice:hunter2-secret@127.0.0.1:{free_port()}"
    done = rackscope("run", *OPENAI_FLAGS, "--url", url, "--requests", "2", "--output", "out.json", cwd=tmp_path)
    assert done.returncode == 1
    assert "cannot reach" in done.stderr
    assert "hunter2-secret" not in done.stderr + done.stdout and "alice" not in done.stderr + done.stdout


@pytest.mark.slow
def test_dataset_files_must_be_regular_and_small_enough(tmp_path: Path) -> None:
    done = rackscope("run", "--dataset", "/dev/zero", cwd=tmp_path, timeout=30)
    assert done.returncode == 2 and "not a regular file" in done.stderr
    big = tmp_path / "big.jsonl"
    big.write_text('{"prompt": "x", "max_tokens": 1}\n' * 40_000)
    done = rackscope("run", "--dataset", str(big), "--dataset-max-mib", "1", cwd=tmp_path)
    assert done.returncode == 2 and "--dataset-max-mib" in done.stderr


# --- the simulated engine ---------------------------------------------------------------------
SIM_FLAGS = ["--engine", "sim", "--gpu-model", "gb300", "--gpus", "4", "--scenario", "offline"]


@pytest.mark.slow
def test_sim_command_as_written_on_virtual_time(tmp_path: Path) -> None:
    done = rackscope("run", *SIM_FLAGS, "--duration", "10", "--output", "out.json", "--virtual-clock", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = load_run(tmp_path / "out.json")
    s = record["summary"]
    assert s["complete"] is True
    assert s["duration_s"] == pytest.approx(10.0)
    assert s["gpus"] == 4
    assert s["output_tokens_per_s"] > 20_000
    assert s["output_tokens_per_s_per_gpu"] == pytest.approx(s["output_tokens_per_s"] / 4)
    assert s["energy_j"] > 0
    assert [g["gpu"] for g in record["per_gpu"]] == [f"{record['config']['node']}/{i}" for i in range(4)]
    assert record["environment"]["gpu_models"] == ["NVIDIA GB300"]
    assert record["environment"]["simulated"] is True
    assert "output tokens/s" in done.stdout
    assert (tmp_path / "out.requests.jsonl").exists()


@pytest.mark.slow
def test_sim_command_on_the_wall_clock(tmp_path: Path) -> None:
    start = time.monotonic()
    done = rackscope("run", *SIM_FLAGS, "--duration", "1", "--warmup", "0", "--output", "out.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start >= 1.0
    s = load_run(tmp_path / "out.json")["summary"]
    assert s["duration_s"] == pytest.approx(1.0)
    assert s["output_tokens"] > 0
    assert s["stop_reason"] == "duration"


@pytest.mark.slow
def test_dataset_file_runs_once_through(tmp_path: Path) -> None:
    lines = [{"prompt": f"question {i} " + "word " * 50, "max_tokens": 20 + i} for i in range(7)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    done = rackscope("run", "--engine", "sim", "--gpus", "1", "--scenario", "concurrency", "--concurrency", "3",
                     "--dataset", "prompts.jsonl", "--output", "ds.json", "--virtual-clock", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = load_run(tmp_path / "ds.json")
    assert record["summary"]["requests_completed"] == 7
    assert record["summary"]["output_tokens"] == sum(20 + i for i in range(7))
    assert record["environment"]["dataset"]["kind"] == "file"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "max_tokens": 2}\n{"prompt": 3}\n')
    done = rackscope("run", "--engine", "sim", "--dataset", str(bad), "--output", "b.json", cwd=tmp_path)
    assert done.returncode == 2
    assert "bad.jsonl:2" in done.stderr
    assert not (tmp_path / "b.json").exists()


def _wait_for(proc: subprocess.Popen[str], text: str, timeout: float = 30.0) -> str:
    """Read the child's stderr until ``text`` shows up."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"{text!r} never appeared; stderr so far:\n{seen}")


@pytest.mark.slow
def _ok_requests(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("rackscope_requests_total{") and 'outcome="ok"' in line)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_run_writes_a_partial_record(tmp_path: Path, sig: int, code: int) -> None:
    metrics_port = free_port()
    proc = subprocess.Popen(
        [*RACKSCOPE, "run", "--engine", "sim", "--gpus", "1", "--scenario", "concurrency", "--concurrency", "8",
         "--duration", "60", "--output-len", "32", "--output", "partial.json", "--metrics-port", str(metrics_port)],
        cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        # Signal once requests have finished (the run's own metrics say so), not after a guess.
        wait_for("finished requests", lambda: _ok_requests(metrics_port) > 0, timeout_s=30)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    record = load_run(tmp_path / "partial.json")
    s = record["summary"]
    assert s["complete"] is False
    assert s["stop_reason"] == "cancelled"
    assert s["requests_completed"] > 0
    assert s["requests_cancelled"] == 8
    assert 0 < s["duration_s"] < 30  # cut short: the run was asked for 60 s
    rows = list(load_requests(tmp_path / "partial.requests.jsonl"))
    assert sum(1 for r in rows if r["error_type"] == "cancelled") == 8


# --- the openai engine --------------------------------------------------------------------------
OPENAI_FLAGS = ["--engine", "openai", "--model", "llama2-70b", "--scenario", "concurrency", "--concurrency", "32"]


@pytest.mark.slow
def test_unreachable_server_fails_clearly_without_a_record(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = rackscope("run", *OPENAI_FLAGS, "--url", url, "--requests", "200", "--output", "out.json", cwd=tmp_path)
    assert done.returncode == 1
    assert "cannot reach" in done.stderr
    assert url in done.stderr
    assert not list(tmp_path.iterdir())


class ServeSim:
    """``rackscope serve-sim`` in a subprocess on a free port."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*RACKSCOPE, "--log-level", "warning", "serve-sim", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, f"serve-sim did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}"
        self.url = match.group(1)

    def finished_ok(self) -> int:
        """Requests the server finished so far (its own /metrics)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("rackscope_sim_requests_finished") and 'outcome="ok"' in line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def serve_sim() -> Iterator[ServeSim]:
    server = ServeSim("--gpu-model", "b200")
    yield server
    server.close()


@pytest.mark.slow
def test_openai_command_as_written(tmp_path: Path, serve_sim: ServeSim) -> None:
    # The command as documented, with fewer and shorter requests.
    done = rackscope("run", *OPENAI_FLAGS, "--url", serve_sim.url, "--requests", "64", "--output-len", "32",
                     "--output", "out.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = load_run(tmp_path / "out.json")
    s = record["summary"]
    assert s["complete"] is True
    assert s["requests_completed"] == 64
    assert s["requests_failed"] == 0
    assert s["output_tokens"] == 64 * 32
    assert s["itl_method"] == "token_gaps"
    assert s["itl_s"]["count"] == 64 * 31
    assert 0 < s["ttft_s"]["p50"] < s["e2e_s"]["p50"]
    assert s["output_tokens_per_s_per_gpu"] is None  # the server's GPUs are not ours to count
    assert record["environment"]["model"] == "llama2-70b"
    assert record["environment"]["output_tokens_method"] == "usage"
    assert record["config"]["concurrency"] == 32
    assert serve_sim.finished_ok() == 64
    rows = list(load_requests(tmp_path / "out.requests.jsonl"))
    assert len(rows) == 64
    assert all(r["ok"] and r["output_tokens"] == 32 for r in rows)


@pytest.mark.slow
def test_workers_share_the_load(tmp_path: Path, serve_sim: ServeSim) -> None:
    done = rackscope("run", *OPENAI_FLAGS, "--url", serve_sim.url, "--requests", "40", "--output-len", "16",
                     "--workers", "2", "--output", "w.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    s = load_run(tmp_path / "w.json")["summary"]
    assert s["requests_completed"] == 40
    assert s["output_tokens"] == 40 * 16


def start_long_http_run(tmp_path: Path, serve_sim: ServeSim) -> subprocess.Popen[str]:
    """A 5,000-request run against serve-sim, returned once 40 requests have finished."""
    client = subprocess.Popen(
        [*RACKSCOPE, "run", *OPENAI_FLAGS, "--url", serve_sim.url, "--requests", "5000", "--output-len", "64",
         "--output", "out.json"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for("40 requests finished on the server", lambda: serve_sim.finished_ok() >= 40, timeout_s=30)
    except AssertionError:
        client.kill()
        raise
    return client


@pytest.mark.slow
def test_server_killed_mid_run_gives_a_partial_record(tmp_path: Path, serve_sim: ServeSim) -> None:
    client = start_long_http_run(tmp_path, serve_sim)
    try:
        serve_sim.proc.kill()
        serve_sim.proc.wait()
        _out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 1, err
    assert "INCOMPLETE (errors)" in _out
    record = load_run(tmp_path / "out.json")
    s = record["summary"]
    assert s["complete"] is False
    assert s["stop_reason"] == "errors"
    assert s["requests_completed"] >= 40
    assert s["requests_failed"] >= 20
    # Streams cut by the kill fail as "protocol"; requests sent after it fail to "connect". Which
    # of them make up the consecutive failures that stop the run depends on timing.
    assert set(s["requests_failed_by_error"]) <= {"connect", "protocol", "timeout"}
    assert s["requests_issued"] < 5000


@pytest.mark.slow
def test_progress_line_only_on_a_terminal(tmp_path: Path) -> None:
    import pty

    main_fd, child_fd = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*RACKSCOPE, "--log-level", "warning", "run", *SIM_FLAGS, "--gpus", "1", "--duration", "1.5",
             "--warmup", "0"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=child_fd, text=True,
        )
        os.close(child_fd)
        proc.communicate(timeout=60)
        chunks = []
        while True:
            try:
                data = os.read(main_fd, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(main_fd)
    shown = b"".join(chunks).decode()
    assert proc.returncode == 0
    assert "\r[measure]" in shown
    assert "tok/s" in shown
    quiet = rackscope("--log-level", "warning", "run", *SIM_FLAGS, "--gpus", "1", "--duration", "1.5",
                      "--warmup", "0", cwd=tmp_path)
    assert quiet.returncode == 0
    assert quiet.stderr == ""


@pytest.mark.slow
def test_otlp_export_when_asked(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    bodies: list[tuple[str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        done = rackscope("run", *SIM_FLAGS, "--gpus", "1", "--scenario", "concurrency", "--concurrency", "4",
                         "--requests", "20", "--virtual-clock", "--node", "n05",
                         "--otlp-endpoint", f"http://127.0.0.1:{server.server_port}", cwd=tmp_path)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert bodies
    assert {path for path, _ in bodies} == {"/v1/metrics"}
    names: dict[str, list[Any]] = {}
    for _, body in bodies:
        req = ExportMetricsServiceRequest()
        req.ParseFromString(body)
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    names.setdefault(m.name, []).append(m)
    assert {"rackscope.tokens", "rackscope.requests", "gen_ai.client.operation.duration"} <= set(names)
    requests = names["rackscope.requests"][-1].sum.data_points
    total = sum(p.as_int for p in requests)
    assert total == 20
    attrs = {kv.key: kv.value.string_value for kv in requests[0].attributes}
    assert (attrs["node"], attrs["engine"], attrs["outcome"]) == ("n05", "sim", "ok")


@pytest.mark.slow
def test_engines_that_cannot_run_here_fail_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no trtllm-bench anywhere
    done = rackscope("run", "--engine", "trtllm", "--model", "m", "--requests", "2", "--output", "o.json",
                     cwd=tmp_path, env={**os.environ})
    assert done.returncode == 1
    assert "TensorRT-LLM is not usable here" in done.stderr
    done = rackscope("run", "--engine", "trtllm-bench", "--model", "m", "--requests", "2", "--output", "o.json",
                     cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert "'trtllm-bench' was not found on PATH" in done.stderr
    assert not (tmp_path / "o.json").exists()


def test_trtllm_bench_report_becomes_a_run_record(tmp_path: Path) -> None:
    # A stand-in for NVIDIA's tool at the process boundary: it writes a recorded real report.
    report = Path(__file__).parent / "engines" / "data" / "trtllm_bench_streaming_energy.json"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "trtllm-bench"
    tool.write_text(
        f"#!{sys.executable}\n"
        "import shutil, sys\n"
        "args = sys.argv[1:]\n"
        "dataset = args[args.index('--dataset') + 1]\n"
        "assert sum(1 for _ in open(dataset)) == 6\n"
        f"shutil.copy({str(report)!r}, args[args.index('--report_json') + 1])\n"
    )
    tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = rackscope("run", "--engine", "trtllm-bench", "--model", "meta-llama/Llama-2-70b-hf", "--requests", "6",
                     "--output", "bench.json", "--gpu-model", "B200", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    record = load_run(tmp_path / "bench.json")
    s = record["summary"]
    expected = json.loads(report.read_text())["performance"]["system_output_throughput_tok_s"]
    assert s["output_tokens_per_s"] == pytest.approx(expected)
    assert s["itl_method"] == "tpot"
    assert s["energy_j"] is not None
    assert record["environment"]["engine"] == "trtllm-bench"
    assert record["requests_file"] is None


@pytest.mark.slow
def test_sigint_during_an_http_run_cancels_in_flight_requests(tmp_path: Path, serve_sim: ServeSim) -> None:
    client = start_long_http_run(tmp_path, serve_sim)
    try:
        client.send_signal(signal.SIGINT)
        _out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 130, err
    s = load_run(tmp_path / "out.json")["summary"]
    assert s["complete"] is False
    assert s["stop_reason"] == "cancelled"
    # What was in flight is cancelled: up to the 32 slots (a slot whose request just finished may
    # be between requests at that instant), and nothing is counted as failed.
    assert 1 <= s["requests_cancelled"] <= 32
    assert s["requests_failed"] == 0
    # The server saw the clients leave: nothing of this run is still running there.
    def running() -> list[float]:
        with urllib.request.urlopen(f"{serve_sim.url}/metrics", timeout=5) as resp:
            return [float(line.rsplit(" ", 1)[1]) for line in resp.read().decode().splitlines()
                    if line.startswith("rackscope_sim_requests_running")]

    assert running()
    wait_for("the server to see every request of the run end", lambda: all(v == 0 for v in running()), timeout_s=10)


@pytest.mark.slow
def test_sweep_prints_a_row_per_point_and_a_named_headline(tmp_path: Path) -> None:
    done = rackscope("run", "--engine", "sim", "--gpu-model", "gb300", "--gpus", "1", "--scenario", "sweep",
                     "--sweep", "2,8,32", "--duration", "3", "--warmup", "0", "--virtual-clock",
                     "--output", "sweep.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = load_run(tmp_path / "sweep.json")
    points = [p["summary"] for p in record["points"]]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("concurrency ")]
    assert [r[1] for r in rows] == ["2", "8", "32"]
    for row, p in zip(rows, points, strict=True):
        assert row[2] == f"{p['output_tokens_per_s']:,.1f}"
        assert row[3] == f"{p['output_tokens_per_j']:.3f}"
        assert row[4:8] == [f"{p[k]['p' + q] * 1e3:,.1f}" for k in ("ttft_s", "tpot_s") for q in ("50", "99")]
        assert row[8:] == ["-", "(no", "limits)"]
    # The top level is the fastest point itself, not an average over the three.
    rates = [p["output_tokens_per_s"] for p in points]
    s = record["summary"]
    assert rates == sorted(rates) and s["output_tokens_per_s"] == rates[-1]
    assert s["ttft_s"] == points[-1]["ttft_s"]
    assert s["sweep"]["point"] == {"concurrency": 32} and s["sweep"]["chosen_by"] == "no_limits"
    assert s["sweep"]["totals"]["output_tokens"] == sum(p["output_tokens"] for p in points)
    assert "the figures above are point concurrency 32 (no limits set" in done.stdout


@pytest.mark.slow
def test_rate_sweep_rows_say_which_points_meet_the_limits(tmp_path: Path) -> None:
    done = rackscope("run", "--engine", "sim", "--gpu-model", "gb300", "--gpus", "1", "--scenario", "sweep",
                     "--sweep-over", "rate", "--sweep", "2,4", "--duration", "4", "--warmup", "0",
                     "--virtual-clock", "--output", "rate.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    points = [p["summary"] for p in load_run(tmp_path / "rate.json")["points"]]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("rate ")]
    assert [r[-1] for r in rows] == [{True: "yes", False: "no"}[p["valid"]] for p in points]


def documented_sim_example() -> list[str]:
    """The sim example of ``rackscope run --help``, flags only, as a user would paste it."""
    done = rackscope("run", "--help", cwd=Path.cwd(), env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    found = re.search(r"rackscope run (--engine sim .*?--output \S+)", done.stdout.replace("\\\n", " "), re.S)
    assert found is not None, done.stdout
    return found.group(1).split()


@pytest.mark.slow
def test_documented_sim_example_reports_what_the_profile_publishes(tmp_path: Path) -> None:
    argv = documented_sim_example()
    flags = parse(*argv)
    expected = profile(flags.gpu_model).llama2_70b_tokens_per_s * flags.gpus
    # Virtual time runs the same simulation as the wall clock, in a moment.
    done = rackscope("run", *argv, "--virtual-clock", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    s = load_run(tmp_path / flags.output)["summary"]
    assert s["complete"] is True
    assert s["output_tokens_per_s"] == pytest.approx(expected, rel=0.05)
    # The README shows the same command.
    readme = (Path(__file__).parents[2] / "README.md").read_text().replace("\\\n", " ")
    assert " ".join(["rackscope run", *argv]) in " ".join(readme.split())


@pytest.mark.slow
def test_an_explicit_warmup_wins_over_the_automatic_one(tmp_path: Path) -> None:
    argv = documented_sim_example()
    done = rackscope("run", *argv, "--warmup", "3s", "--virtual-clock", "--output", "w.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = load_run(tmp_path / "w.json")
    assert (record["config"]["warmup_s"], record["config"]["warmup_auto"]) == (3.0, False)
    assert record["summary"]["duration_s"] == pytest.approx(parse(*argv).duration_s)
