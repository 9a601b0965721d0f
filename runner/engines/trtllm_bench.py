"""Running NVIDIA's ``trtllm-bench throughput`` as a subprocess and reading its report JSON.

trtllm-bench drives TensorRT-LLM in-flight batching itself and writes one report per run,
so this is not a streaming ``Engine``: it is a runner that turns our requests into
trtllm-bench's dataset, runs the tool, and turns its report into the run record's summary.

The command line (TensorRT-LLM's ``trtllm-bench`` docs): global options come before the
subcommand, ``trtllm-bench --model M [--model_path P] [--workspace W] throughput
--dataset FILE [--backend pytorch] [--tp N] [--concurrency N] [--streaming]
--report_json FILE``. trtllm-bench ignores EOS unless given ``--eos_id``, so output lengths
are the dataset's ``output_tokens``.

The report (``ReportUtility.get_statistics_dict``): ``performance`` holds
``system_output_throughput_tok_s``, ``system_total_throughput_tok_s``,
``request_throughput_req_s``, ``output_throughput_per_gpu_tok_s``,
``output_throughput_per_user_tok_s``, ``total_latency_ms`` and
``request_latency_percentiles_ms``; ``streaming_metrics`` (only with ``--streaming``) holds
``avg_ttft_ms``, ``avg_tpot_ms``, ``ttft_percentiles`` and ``tpot_percentiles``. Percentile
blocks have ``p50 p90 p95 p99 minimum maximum average`` in milliseconds (older releases lack
``p90``; none has p99.9). ``request_info`` has ``num_requests`` and the mean input/output
lengths.

No live token counts: the tool reports only when it exits, and its requests never pass
through the run loop, so nothing of them reaches ``rackscope.tokens`` (or the latency
histograms) while it runs, or after; its figures are in the run record alone. For live
tokens/s on the dashboards, run TensorRT-LLM through the ``trtllm`` engine (in process,
streaming) or behind ``trtllm-serve`` with the ``openai`` engine.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rackscope.errors import EngineError, EngineUnavailable, ResultError
from rackscope.runner.engines.base import Request

log = logging.getLogger(__name__)

EXECUTABLE = "trtllm-bench"
INSTALL_HINT = (
    "trtllm-bench comes with TensorRT-LLM: pip install rackscope[trtllm] from NVIDIA's index, or use "
    "NVIDIA's NGC TensorRT-LLM container; see docs/real-nodes.md"
)
DATASET_NAME = "trtllm-bench-dataset.jsonl"
REPORT_NAME = "trtllm-bench-report.json"
LOG_NAME = "trtllm-bench.log"
LOG_TAIL_LINES = 40
MS_PER_S = 1000.0
# The run record's distribution keys (runner.results.stats.distribution), and where each comes
# from in a trtllm-bench percentile block; trtllm-bench reports no p99.9.
DISTRIBUTION_KEYS = {
    "mean": "average",
    "min": "minimum",
    "max": "maximum",
    "p50": "p50",
    "p90": "p90",
    "p95": "p95",
    "p99": "p99",
    "p999": None,
}
# Newer trtllm-bench releases measure GPU energy with NVML (its report prints "Total Energy
# (J)"); the JSON key name could not be confirmed from a released report, so any numeric key
# that names energy in joules, in ``performance`` or an ``energy*`` section, is accepted.
ENERGY_KEY = re.compile(r"energy.*_(j|joules)$")


class TrtllmBenchRunner:
    """One ``trtllm-bench throughput`` run over a list of our requests."""

    def __init__(
        self,
        model: str,
        *,
        tp: int = 1,
        backend: str = "pytorch",
        concurrency: int | None = None,
        streaming: bool = True,
        model_path: str | None = None,
        executable: str = EXECUTABLE,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        if tp < 1:
            raise ValueError(f"tp must be at least 1, not {tp}")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.model = model
        self.tp = tp
        self.backend = backend
        self.concurrency = concurrency
        self.streaming = streaming
        self.model_path = model_path
        self.executable = executable
        self.extra_args = list(extra_args)
        self.env = dict(env) if env is not None else None
        self.timeout_s = timeout_s

    def is_available(self) -> bool:
        """True when the trtllm-bench executable is found here."""
        return shutil.which(self.executable, path=(self.env or os.environ).get("PATH")) is not None

    def resolve_executable(self) -> str:
        """The path of the trtllm-bench to run, or ``EngineUnavailable`` with the hint."""
        search_path = (self.env or os.environ).get("PATH")
        found = shutil.which(self.executable, path=search_path)
        if found is None:
            raise EngineUnavailable(f"{self.executable!r} was not found on PATH; hint: {INSTALL_HINT}")
        return found

    def command(self, executable: str, dataset: Path, report: Path, workspace: Path) -> list[str]:
        """The argument list (never a shell string) for one run."""
        args = [executable, "--model", self.model]
        if self.model_path is not None:
            args += ["--model_path", self.model_path]
        args += ["--workspace", str(workspace), "throughput", "--dataset", str(dataset)]
        args += ["--backend", self.backend, "--tp", str(self.tp)]
        if self.concurrency is not None:
            args += ["--concurrency", str(self.concurrency)]
        if self.streaming:
            args.append("--streaming")
        args += ["--report_json", str(report), *self.extra_args]
        return args

    def run(self, requests: Sequence[Request], workdir: Path) -> dict[str, Any]:
        """Write the dataset, run trtllm-bench (log to ``workdir``), return ``parse_report``'s summary."""
        if not requests:
            raise ValueError("trtllm-bench needs at least one request")
        executable = self.resolve_executable()
        workdir.mkdir(parents=True, exist_ok=True)
        dataset = write_dataset(requests, workdir / DATASET_NAME)
        report = workdir / REPORT_NAME
        report.unlink(missing_ok=True)  # a stale report must not pass for this run's
        workspace = workdir / "workspace"
        workspace.mkdir(exist_ok=True)
        log_path = workdir / LOG_NAME
        args = self.command(executable, dataset, report, workspace)
        log.info("running %s (log: %s)", " ".join(args), log_path)
        with log_path.open("wb") as log_file:
            try:
                completed = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    timeout=self.timeout_s,
                    check=False,
                )
            except FileNotFoundError as exc:
                raise EngineUnavailable(f"{executable!r} could not be started; hint: {INSTALL_HINT}") from exc
            except subprocess.TimeoutExpired as exc:
                raise EngineError(
                    f"trtllm-bench did not finish within {self.timeout_s} s; last lines of {log_path}:\n"
                    f"{log_tail(log_path)}"
                ) from exc
        if completed.returncode != 0:
            raise EngineError(
                f"trtllm-bench exited with status {completed.returncode}; last lines of {log_path}:\n"
                f"{log_tail(log_path)}"
            )
        return parse_report(report)


def dataset_line(task_id: int, request: Request) -> dict[str, Any]:
    """One line of trtllm-bench's dataset: ``{"task_id", "prompt" | "input_ids", "output_tokens"}``."""
    line: dict[str, Any] = {"task_id": task_id}
    if request.input_ids is not None:
        line["input_ids"] = list(request.input_ids)
    elif request.prompt is not None:
        line["prompt"] = request.prompt
    else:
        raise ValueError(f"request {request.request_id} has neither prompt nor input_ids")
    line["output_tokens"] = request.max_output_tokens
    return line


def write_dataset(requests: Sequence[Request], path: Path) -> Path:
    """Write the requests as trtllm-bench JSONL; task ids are the requests' positions."""
    with path.open("w", encoding="utf-8") as out:
        for task_id, request in enumerate(requests):
            out.write(json.dumps(dataset_line(task_id, request)) + "\n")
    return path


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as log_file:
            return "".join(deque(log_file, maxlen=lines)).rstrip()
    except OSError as exc:
        return f"(log unreadable: {exc})"


def _required_number(section: Mapping[str, Any], key: str, where: str) -> float:
    value = _number(section, key, where)
    if value is None:
        raise ResultError(f"trtllm-bench report has no {where}.{key}")
    return value


def _number(section: Mapping[str, Any], key: str, where: str) -> float | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ResultError(f"trtllm-bench report {where}.{key} is not a number: {value!r}")
    return float(value)


def _section(report: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = report.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ResultError(f"trtllm-bench report {key} is not an object")
    return value


def _required_section(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = _section(report, key)
    if value is None:
        raise ResultError(f"trtllm-bench report has no {key} section")
    return value


def _distribution_s(block: Any, where: str, count: int | None, mean_ms: float | None = None) -> dict[str, Any]:
    """A percentile block in ms as the run record's distribution in seconds.

    Keys ``count mean min max p50 p90 p95 p99 p999``; all None with count 0 when the report
    has no such block (TTFT and TPOT of a non-streaming run).
    """
    if block is not None and not isinstance(block, Mapping):
        raise ResultError(f"trtllm-bench report {where} is not an object")
    values: dict[str, Any] = {"count": 0 if block is None and mean_ms is None else count}
    for ours, theirs in DISTRIBUTION_KEYS.items():
        value_ms = _number(block, theirs, where) if block is not None and theirs is not None else None
        values[ours] = None if value_ms is None else value_ms / MS_PER_S
    if mean_ms is not None:
        values["mean"] = mean_ms / MS_PER_S
    return values


def _energy_j(report: Mapping[str, Any], performance: Mapping[str, Any]) -> float | None:
    sections: list[tuple[str, Mapping[str, Any]]] = [("performance", performance)]
    sections += [(k, v) for k, v in report.items() if k.startswith("energy") and isinstance(v, Mapping)]
    for where, section in sections:
        for key in sorted(section):
            if ENERGY_KEY.search(key) and "per" not in key:
                return _number(section, key, where)
    return None


def parse_report(path: Path) -> dict[str, Any]:
    """A trtllm-bench report JSON as the run record's ``summary`` (seconds, not ms).

    The keys are those of ``runner.results.window.summarize``: request counts, ``input_tokens``,
    ``output_tokens``, ``duration_s``, throughputs (``output_tokens_per_s``,
    ``output_tokens_per_s_per_gpu``, ``total_tokens_per_s``, ``requests_per_s``), ``gpus``,
    energy (``energy_j``, ``average_power_w``, ``output_tokens_per_j``: None unless the
    report measured it) and the distributions ``ttft_s``, ``itl_s``, ``tpot_s``, ``e2e_s``
    (``count mean min max p50 p90 p95 p99 p999``, None where the report lacks a value; TTFT
    and TPOT are empty for a non-streaming run; trtllm-bench has no token gaps, so ``itl_s``
    is its per-request TPOT, ``itl_method`` "tpot"). Besides: ``output_tokens_per_s_per_user``
    and ``trtllm_bench`` (version, backend, tp_size, gpu_name, streaming). trtllm-bench fails
    the whole run when a request fails, so a report means every request completed. A
    missing or malformed report raises ``ResultError``.
    """
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ResultError(f"trtllm-bench wrote no report at {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(f"trtllm-bench report {path} is not readable JSON: {exc}") from exc
    if not isinstance(report, Mapping):
        raise ResultError(f"trtllm-bench report {path} is not a JSON object")

    performance = _required_section(report, "performance")
    streaming = _section(report, "streaming_metrics")
    request_info = _section(report, "request_info") or {}
    engine = _section(report, "engine") or {}
    world = _section(report, "world_info") or {}
    machine = _section(report, "machine") or {}

    output_tokens_per_s = _required_number(performance, "system_output_throughput_tok_s", "performance")
    count = _number(request_info, "num_requests", "request_info")
    num_requests = None if count is None else int(count)
    avg_input = _number(request_info, "avg_input_length", "request_info")
    avg_output = _number(request_info, "avg_output_length", "request_info")
    total_latency_ms = _number(performance, "total_latency_ms", "performance")
    duration_s = None if total_latency_ms is None else total_latency_ms / MS_PER_S
    output_tokens = round(avg_output * num_requests) if avg_output is not None and num_requests is not None else None
    if output_tokens is None and duration_s is not None:
        output_tokens = round(output_tokens_per_s * duration_s)
    world_size = _number(world, "world_size", "world_info") or _number(world, "tp_size", "world_info")
    energy_j = _energy_j(report, performance)

    stream = streaming or {}
    tpot_s = _distribution_s(
        stream.get("tpot_percentiles"),
        "streaming_metrics.tpot_percentiles",
        num_requests,
        _number(stream, "avg_tpot_ms", "streaming_metrics"),
    )
    return {
        "complete": True,
        "requests_issued": num_requests,
        "requests_completed": num_requests,
        "requests_failed": 0,
        "requests_failed_by_error": {},
        "requests_cancelled": 0,
        "input_tokens": round(avg_input * num_requests) if avg_input is not None and num_requests is not None else None,
        "output_tokens": output_tokens,
        "duration_s": duration_s,
        "requests_per_s": _number(performance, "request_throughput_req_s", "performance"),
        "output_tokens_per_s": output_tokens_per_s,
        "total_tokens_per_s": _number(performance, "system_total_throughput_tok_s", "performance"),
        "gpus": None if world_size is None else int(world_size),
        "output_tokens_per_s_per_gpu": _number(performance, "output_throughput_per_gpu_tok_s", "performance"),
        "output_tokens_per_s_per_user": _number(performance, "output_throughput_per_user_tok_s", "performance"),
        "energy_j": energy_j,
        "average_power_w": energy_j / duration_s if energy_j is not None and duration_s else None,
        "output_tokens_per_j": output_tokens / energy_j if output_tokens is not None and energy_j else None,
        "ttft_s": _distribution_s(
            stream.get("ttft_percentiles"),
            "streaming_metrics.ttft_percentiles",
            num_requests,
            _number(stream, "avg_ttft_ms", "streaming_metrics"),
        ),
        "itl_s": dict(tpot_s),
        "itl_method": "tpot",
        "tpot_s": tpot_s,
        "e2e_s": _distribution_s(
            performance.get("request_latency_percentiles_ms"),
            "performance.request_latency_percentiles_ms",
            num_requests,
            _number(performance, "avg_request_latency_ms", "performance"),
        ),
        "trtllm_bench": {
            "version": engine.get("version"),
            "backend": engine.get("backend"),
            "tp_size": world.get("tp_size"),
            "gpu_name": machine.get("name"),
            "streaming": streaming is not None,
        },
    }
