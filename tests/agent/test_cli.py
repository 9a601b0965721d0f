"""``rackscope agent`` as users run it: real subprocesses, real signals, real HTTP."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.agent.conftest import spawn_agent
from tests.agent.telemetry.otlp_receiver import OtlpHttpReceiver
from tests.helpers import free_port, wait_for


def rackscope(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rackscope", *args], capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.slow
def test_the_documented_command_line_works_and_stops_cleanly_on_sigterm() -> None:
    metrics, api = free_port(), free_port()
    agent = spawn_agent(
        "--source",
        "sim",
        "--gpu-model",
        "gb300",
        "--gpus",
        "4",
        "--rack",
        "r1",
        "--node",
        "n01",
        "--metrics-port",
        str(metrics),
        "--api-port",
        str(api),
    )
    try:
        assert (agent.metrics_port, agent.api_port) == (metrics, api)
        text = httpx.get(f"http://127.0.0.1:{metrics}/metrics").text
        for name in (
            "hw_power_watts",
            "hw_energy_joules_total",
            "hw_gpu_memory_usage_bytes",
            "hw_gpu_memory_limit_bytes",
            "hw_temperature_celsius",
            "hw_gpu_io_bytes_total",
            "hw_errors_total",
        ):
            assert f'\n{name}{{rack="r1",node="n01",gpu="3"' in text, name
        assert 'rackscope_node_info{rack="r1",node="n01",source="sim",simulated="true"' in text
        assert httpx.get(f"http://127.0.0.1:{api}/v1/node").json()["gpu_model"] == "NVIDIA GB300"
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(15) == 0
        assert time.monotonic() - started < 10
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_shutdown_flushes_the_last_otlp_export(sig: signal.Signals) -> None:
    receiver = OtlpHttpReceiver()
    try:
        # A long export interval: only the shutdown flush can deliver anything.
        agent = spawn_agent(
            "--source",
            "sim",
            "--gpus",
            "2",
            "--node",
            "n02",
            "--metrics-port",
            "0",
            "--api-port",
            "0",
            "--otlp-endpoint",
            receiver.url,
            "--otlp-interval",
            "600",
        )
        # Sampled at least once (both GPUs on /metrics), yet nothing exported: the interval is
        # far away, so whatever arrives after the signal is the shutdown flush's doing.
        wait_for(
            "both GPUs sampled",
            lambda: httpx.get(f"http://127.0.0.1:{agent.metrics_port}/metrics").text.count("rackscope_gpu_up{") == 2,
        )
        assert receiver.points() == []
        agent.proc.send_signal(sig)
        assert agent.proc.wait(15) == 0
        names = {p.name for p in receiver.points()}
        assert {"hw.power", "hw.energy", "hw.gpu.memory.usage"} <= names
        power = [p for p in receiver.points() if p.name == "hw.power"]
        assert {p.attributes["node"] for p in power} == {"n02"}
        assert {p.attributes["gpu"] for p in power} == {"0", "1"}
    finally:
        receiver.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "nvml", "--gpus", "4"], "only apply to --source sim"),
        (["--source", "dcgm", "--workload", "offline"], "--workload drives simulated GPUs"),
        (["--api-host", "0.0.0.0"], "refusing to serve the control API on 0.0.0.0 without a token"),
        (["--interval", "0"], "--interval must be between"),
        (["--inject", "meltdown"], "unknown fault 'meltdown'"),
        (["--gpu-model", "a100"], "invalid choice"),
        (["--workload", "server"], "needs --rate"),
        (["--metrics-port", "9000", "--api-port", "9000"], "must differ"),
        (["--dcgm-url", "http://x:9400/metrics"], "--dcgm-url only applies to --source dcgm"),
        (["--api-token-file", "/nonexistent/token"], "--api-token-file /nonexistent/token: cannot read it"),
        (["--api-token", "a", "--api-token-file", "/dev/null"], "give the API token once"),
        (["--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data is not a directory"),
        (["--node", "../n01"], "--node must be"),
        (["--workload", "concurrency", "--concurrency", "100000"], "concurrency must be at most 16,384"),
    ],
)
@pytest.mark.slow
def test_bad_flags_exit_2_with_a_message(args: list[str], message: str) -> None:
    result = rackscope("agent", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_help_shows_defaults() -> None:
    result = rackscope("agent", "--help")
    assert result.returncode == 0
    for text in ("default: 9464", "default: 9470", "default: 127.0.0.1", "default: auto", "power-cap"):
        assert text in result.stdout, text


@pytest.mark.slow
def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = rackscope("agent", "--source", "sim", "--metrics-port", str(port), "--api-port", "0")
    assert result.returncode != 0
    assert "rackscope agent: error:" in result.stderr and "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_auto_falls_back_to_sim_with_one_log_line() -> None:
    agent = spawn_agent(
        "--source", "auto", "--metrics-port", "0", "--api-port", "0", env={"LD_LIBRARY_PATH": "/nonexistent"}
    )
    try:
        fallback = [line for line in agent.stderr_lines if "source auto" in line]
        assert len(fallback) == 1 and "using simulated GPUs" in fallback[0]
        assert httpx.get(f"http://127.0.0.1:{agent.api_port}/v1/node").json()["source"] == "sim"
    finally:
        agent.proc.terminate()
        agent.proc.wait(15)


def test_an_empty_token_file_exits_2(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(" \n")
    token.chmod(0o600)
    result = rackscope("agent", "--api-token-file", str(token))
    assert result.returncode == 2
    assert "is empty" in result.stderr


def test_help_says_a_token_flag_shows_in_ps() -> None:
    result = rackscope("agent", "--help")
    assert "`ps`" in result.stdout and "--api-token-file" in result.stdout and "--data-dir" in result.stdout
