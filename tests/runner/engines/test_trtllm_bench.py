"""trtllm-bench: reading its report JSON, and running it as a real subprocess.

The report files under ``data/`` follow the layout trtllm-bench's ``ReportUtility`` writes
(``engine``, ``machine``, ``world_info``, ``request_info``, ``performance``,
``streaming_metrics`` with ms percentile blocks ``p50 p90 p95 p99 minimum maximum average``).
The non-streaming one is from an older release (no ``machine`` section, no ``p90``). The
energy keys in ``trtllm_bench_streaming_energy.json`` (``total_energy_j``...) are our
reading of trtllm-bench's NVML energy report, not copied from a released report.

The subprocess tests put a stand-in ``trtllm-bench`` first on PATH. It is the vendor
boundary: a real executable that checks the argument list it was given and the dataset it
was pointed at, writes a report in trtllm-bench's layout from that dataset, and exits 0 or 1.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from rackscope.errors import EngineError, EngineUnavailable, ResultError
from rackscope.runner.engines.base import Request
from rackscope.runner.engines.trtllm_bench import (
    DATASET_NAME,
    INSTALL_HINT,
    LOG_NAME,
    REPORT_NAME,
    TrtllmBenchRunner,
    dataset_line,
    parse_report,
)
from rackscope.runner.results.record import LATENCY_KEYS, REQUIRED_SUMMARY_KEYS
from rackscope.runner.results.stats import distribution

DATA = Path(__file__).parent / "data"
MODEL = "nvidia/Llama-3.1-8B-Instruct-FP8"


def dist(count: int, mean: Any, lo: Any, hi: Any, p50: Any, p90: Any, p95: Any, p99: Any) -> dict[str, Any]:
    """A run-record distribution; trtllm-bench never reports p99.9."""
    return {
        "count": count,
        "mean": mean,
        "min": lo,
        "max": hi,
        "p50": p50,
        "p90": p90,
        "p95": p95,
        "p99": p99,
        "p999": None,
    }


# ---------------------------------------------------------------- parsing real-layout reports


def test_a_streaming_report_becomes_the_summary_in_seconds() -> None:
    summary = parse_report(DATA / "trtllm_bench_streaming.json")
    # 1000 requests x 128 output tokens in 9.0125 s
    assert summary["output_tokens_per_s"] == pytest.approx(128_000 / 9.0125)
    assert summary["output_tokens_per_s_per_gpu"] == pytest.approx(128_000 / 9.0125)
    assert summary["total_tokens_per_s"] == pytest.approx(256_000 / 9.0125)
    assert summary["requests_per_s"] == pytest.approx(1000 / 9.0125)
    assert summary["output_tokens_per_s_per_user"] == pytest.approx(111.9)
    assert summary["requests_completed"] == 1000
    assert summary["requests_failed"] == 0
    assert summary["complete"] is True
    assert summary["gpus"] == 1
    assert summary["input_tokens"] == 128_000
    assert summary["output_tokens"] == 128_000
    assert summary["duration_s"] == pytest.approx(9.0125)
    assert summary["e2e_s"] == pytest.approx(dist(1000, 1.1483, 0.9881, 1.3772, 1.1398, 1.2017, 1.224, 1.3106))
    assert summary["ttft_s"] == pytest.approx(dist(1000, 0.0736, 0.0183, 0.2915, 0.0612, 0.1314, 0.1529, 0.2447))
    assert summary["tpot_s"] == pytest.approx(dist(1000, 0.00846, 0.00762, 0.01007, 0.00841, 0.00888, 0.00902, 0.00951))
    # trtllm-bench measures no token gaps: its per-request TPOT stands in for ITL.
    assert summary["itl_s"] == summary["tpot_s"]
    assert summary["itl_method"] == "tpot"
    assert summary["energy_j"] is None
    assert summary["average_power_w"] is None
    assert summary["output_tokens_per_j"] is None
    assert summary["trtllm_bench"] == {
        "version": "1.0.0",
        "backend": "Pytorch",
        "tp_size": 1,
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "streaming": True,
    }


def test_a_non_streaming_report_has_no_ttft_or_tpot_and_per_gpu_throughput() -> None:
    summary = parse_report(DATA / "trtllm_bench_nonstreaming.json")
    assert summary["output_tokens_per_s"] == pytest.approx(3000 * 1024 / 95.211)
    assert summary["output_tokens_per_s_per_gpu"] == pytest.approx(3000 * 1024 / 95.211 / 8)
    assert summary["requests_completed"] == 3000
    assert summary["gpus"] == 8
    assert summary["ttft_s"] == dist(0, None, None, None, None, None, None, None)
    assert summary["tpot_s"] == dist(0, None, None, None, None, None, None, None)
    # This older release has no p90: None, not zero.
    assert summary["e2e_s"] == pytest.approx(dist(3000, 24.8039, 11.4028, 48.1209, 24.517, None, 41.1662, 47.3025))
    assert summary["trtllm_bench"]["gpu_name"] is None
    assert summary["trtllm_bench"]["tp_size"] == 8
    assert summary["trtllm_bench"]["streaming"] is False


def test_a_report_with_energy_gives_tokens_per_joule() -> None:
    summary = parse_report(DATA / "trtllm_bench_streaming_energy.json")
    assert summary["energy_j"] == pytest.approx(73382.4)
    assert summary["average_power_w"] == pytest.approx(3360.0)
    assert summary["output_tokens"] == 2000 * 256
    assert summary["output_tokens_per_j"] == pytest.approx(512_000 / 73382.4)
    assert summary["output_tokens_per_s_per_gpu"] == pytest.approx(512_000 / 21.84 / 4)
    assert summary["ttft_s"]["p99"] == pytest.approx(0.6551)


@pytest.mark.parametrize(
    "name", ["trtllm_bench_streaming.json", "trtllm_bench_nonstreaming.json", "trtllm_bench_streaming_energy.json"]
)
def test_the_summary_has_every_key_a_run_record_requires(name: str) -> None:
    summary = parse_report(DATA / name)
    assert set(REQUIRED_SUMMARY_KEYS) <= set(summary)
    for key in LATENCY_KEYS:
        assert set(summary[key]) == set(distribution([]))


def test_the_malformed_report_file_is_a_result_error() -> None:
    with pytest.raises(ResultError, match="system_output_throughput_tok_s"):
        parse_report(DATA / "trtllm_bench_malformed.json")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"performance": {"system_output_throughput_tok_s": 10', "not readable JSON"),
        ("[1, 2, 3]", "not a JSON object"),
        ('{"engine": {"version": "1.0.0"}}', "no performance section"),
        ('{"performance": [1]}', "performance is not an object"),
        ('{"performance": {"system_output_throughput_tok_s": "fast"}}', "is not a number"),
        (
            '{"performance": {"system_output_throughput_tok_s": 5.0, "request_latency_percentiles_ms": {"p50": "x"}}}',
            "request_latency_percentiles_ms.p50 is not a number",
        ),
        ('{"performance": {"system_output_throughput_tok_s": 5.0}, "streaming_metrics": 3}', "not an object"),
    ],
)
def test_malformed_reports_are_result_errors(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "report.json"
    path.write_text(content)
    with pytest.raises(ResultError, match=needle):
        parse_report(path)


def test_a_missing_report_is_a_result_error(tmp_path: Path) -> None:
    with pytest.raises(ResultError, match="wrote no report"):
        parse_report(tmp_path / "absent.json")


# ---------------------------------------------------------------- the dataset


def test_dataset_lines_carry_prompt_or_token_ids_and_output_tokens() -> None:
    assert dataset_line(0, Request("a", prompt="Hello there", max_output_tokens=64)) == {
        "task_id": 0,
        "prompt": "Hello there",
        "output_tokens": 64,
    }
    # Token ids win over text when a request has both: they are what the engine would see.
    assert dataset_line(7, Request("b", prompt="x", input_ids=[1, 2, 3], max_output_tokens=8)) == {
        "task_id": 7,
        "input_ids": [1, 2, 3],
        "output_tokens": 8,
    }
    with pytest.raises(ValueError, match="neither prompt nor input_ids"):
        dataset_line(1, Request("c"))


# ---------------------------------------------------------------- the subprocess (vendor boundary)

STAND_IN = r"""
import json, os, sys, time

argv = sys.argv[1:]
with open(os.environ["STANDIN_ARGV_FILE"], "w") as f:
    json.dump(sys.argv, f)
print("[TensorRT-LLM] TensorRT-LLM version: 1.0.0", flush=True)

def fail(message, code=2):
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)

# Global options come before the subcommand, as trtllm-bench's click group requires.
if "throughput" not in argv:
    fail("Error: Missing command.")
split = argv.index("throughput")
global_args, command_args = argv[:split], argv[split + 1:]
if global_args[:1] != ["--model"] or len(global_args) < 2:
    fail("Error: Missing option '--model' / '-m'.")

def option(name, args=command_args):
    return args[args.index(name) + 1] if name in args else None

dataset, report = option("--dataset"), option("--report_json")
if dataset is None or report is None:
    fail("Error: --dataset and --report_json are required here")
requests = [json.loads(line) for line in open(dataset)]
for r in requests:
    if set(r) - {"task_id", "prompt", "input_ids", "output_tokens"} or "output_tokens" not in r:
        fail(f"Error: bad dataset line {r}")

mode = os.environ.get("STANDIN_MODE", "ok")
if mode == "fail":
    print("[TRT-LLM] [I] Setting up throughput benchmark.", flush=True)
    print("RuntimeError: [TensorRT-LLM][ERROR] CUDA runtime error in cudaMalloc: out of memory", file=sys.stderr)
    sys.exit(1)
if mode == "hang":
    time.sleep(60)
if mode == "noreport":
    sys.exit(0)

n = len(requests)
osl = sum(r["output_tokens"] for r in requests)
isl = sum(len(r["input_ids"]) if "input_ids" in r else len(r["prompt"].split()) for r in requests)
seconds = 2.0
tp = int(option("--tp") or 1)
lat = {"p50": 1500.0, "p90": 1800.0, "p95": 1900.0, "p99": 1990.0,
       "minimum": 900.0, "maximum": 2000.0, "average": 1480.0}
data = {
    "engine": {"model": global_args[1], "version": "1.0.0", "backend": option("--backend")},
    "world_info": {"tp_size": tp, "world_size": tp},
    "request_info": {"num_requests": n, "avg_input_length": isl / n, "avg_output_length": osl / n},
    "performance": {
        "total_latency_ms": seconds * 1000,
        "avg_request_latency_ms": 1480.0,
        "request_throughput_req_s": n / seconds,
        "system_output_throughput_tok_s": osl / seconds,
        "system_total_throughput_tok_s": (isl + osl) / seconds,
        "output_throughput_per_user_tok_s": 40.0,
        "output_throughput_per_gpu_tok_s": osl / seconds / tp,
        "request_latency_percentiles_ms": lat,
    },
}
if "--streaming" in command_args:
    data["streaming_metrics"] = {
        "avg_ttft_ms": 50.0, "avg_tpot_ms": 20.0,
        "ttft_percentiles": {"p50": 45.0, "p90": 80.0, "p95": 90.0, "p99": 99.0, "average": 50.0},
        "tpot_percentiles": {"p50": 19.0, "p90": 22.0, "p95": 23.0, "p99": 25.0, "average": 20.0},
    }
with open(report, "w") as f:
    json.dump(data, f)
print(f"[TRT-LLM] [I] Writing report to '{report}'.", flush=True)
"""


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``trtllm-bench`` executable first on PATH; returns the file its argv lands in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "trtllm-bench"
    exe.write_text(f"#!{sys.executable}\n{STAND_IN}")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    argv_file = tmp_path / "argv.json"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("STANDIN_ARGV_FILE", str(argv_file))
    monkeypatch.delenv("STANDIN_MODE", raising=False)
    return argv_file


REQUESTS = [
    Request("r0", prompt="The capital of France is", max_output_tokens=100),
    Request("r1", input_ids=[1, 15043, 29892, 920], max_output_tokens=60),
    Request("r2", prompt="Write a haiku", max_output_tokens=40),
]


def test_run_passes_the_documented_argument_list_and_returns_the_summary(stand_in: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    runner = TrtllmBenchRunner(MODEL, tp=2, concurrency=64, streaming=True, extra_args=["--warmup", "0"])
    assert runner.is_available() is True
    summary = runner.run(REQUESTS, workdir)

    argv = json.loads(stand_in.read_text())
    assert Path(argv[0]).name == "trtllm-bench"
    assert argv[1:] == [
        "--model",
        MODEL,
        "--workspace",
        str(workdir / "workspace"),
        "throughput",
        "--dataset",
        str(workdir / DATASET_NAME),
        "--backend",
        "pytorch",
        "--tp",
        "2",
        "--concurrency",
        "64",
        "--streaming",
        "--report_json",
        str(workdir / REPORT_NAME),
        "--warmup",
        "0",
    ]
    lines = [json.loads(line) for line in (workdir / DATASET_NAME).read_text().splitlines()]
    assert lines == [
        {"task_id": 0, "prompt": "The capital of France is", "output_tokens": 100},
        {"task_id": 1, "input_ids": [1, 15043, 29892, 920], "output_tokens": 60},
        {"task_id": 2, "prompt": "Write a haiku", "output_tokens": 40},
    ]
    assert summary["output_tokens_per_s"] == pytest.approx(200 / 2.0)
    assert summary["output_tokens_per_s_per_gpu"] == pytest.approx(200 / 2.0 / 2)
    assert summary["requests_completed"] == 3
    assert summary["output_tokens"] == 200
    assert summary["input_tokens"] == 5 + 4 + 3
    assert summary["ttft_s"] == pytest.approx(dist(3, 0.05, None, None, 0.045, 0.08, 0.09, 0.099))
    assert summary["e2e_s"]["p99"] == pytest.approx(1.99)
    log_text = (workdir / LOG_NAME).read_text()
    assert "Writing report to" in log_text


def test_a_model_path_and_no_streaming_or_concurrency_change_the_arguments(stand_in: Path, tmp_path: Path) -> None:
    runner = TrtllmBenchRunner(MODEL, backend="_autodeploy", streaming=False, model_path="/models/llama-8b")
    summary = runner.run(REQUESTS[:1], tmp_path / "run")
    argv = json.loads(stand_in.read_text())[1:]
    assert argv[:6] == [
        "--model",
        MODEL,
        "--model_path",
        "/models/llama-8b",
        "--workspace",
        str(tmp_path / "run" / "workspace"),
    ]
    assert "--streaming" not in argv
    assert "--concurrency" not in argv
    assert argv[argv.index("--backend") + 1] == "_autodeploy"
    assert summary["ttft_s"]["count"] == 0
    assert summary["requests_completed"] == 1


def test_a_failing_run_is_an_engine_error_with_the_log_tail(
    stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STANDIN_MODE", "fail")
    with pytest.raises(EngineError) as caught:
        TrtllmBenchRunner(MODEL).run(REQUESTS, tmp_path / "run")
    message = str(caught.value)
    assert "exited with status 1" in message
    assert "cudaMalloc: out of memory" in message
    assert "Setting up throughput benchmark" in message


def test_a_run_that_writes_no_report_is_a_result_error(
    stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / REPORT_NAME).write_text((DATA / "trtllm_bench_streaming.json").read_text())  # a stale one
    monkeypatch.setenv("STANDIN_MODE", "noreport")
    with pytest.raises(ResultError, match="wrote no report"):
        TrtllmBenchRunner(MODEL).run(REQUESTS, workdir)


@pytest.mark.slow
def test_a_run_past_its_timeout_is_an_engine_error(
    stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STANDIN_MODE", "hang")
    with pytest.raises(EngineError, match=r"did not finish within 1\.0 s"):
        TrtllmBenchRunner(MODEL, timeout_s=1.0).run(REQUESTS, tmp_path / "run")


def test_without_trtllm_bench_on_path_the_runner_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert TrtllmBenchRunner(MODEL).is_available() is False
    with pytest.raises(EngineUnavailable) as caught:
        TrtllmBenchRunner(MODEL).run(REQUESTS, tmp_path / "run")
    assert INSTALL_HINT in str(caught.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("kwargs", "needle"), [({"tp": 0}, "tp"), ({"concurrency": 0}, "concurrency")])
def test_bad_settings_are_rejected(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        TrtllmBenchRunner(MODEL, **kwargs)


def test_an_empty_request_list_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one request"):
        TrtllmBenchRunner(MODEL).run([], tmp_path)
