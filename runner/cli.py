"""The runner's commands: ``rackscope run``, ``compare``, ``report`` and ``serve-sim``.

Flags and wiring only; what the commands do lives in modules named for it: ``runner.driver``
(a run in this process), ``runner.bench_run`` (a tool that runs the whole benchmark),
``runner.compare``, ``runner.report`` and ``runner.serve_sim``. Heavy dependencies are
imported inside the command functions so ``rackscope --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rackscope.errors import ConfigError, RackscopeError, ResultError
from rackscope.runner.config import parse_seconds, parse_warmup

if TYPE_CHECKING:
    from rackscope.runner.config import RunConfig
    from rackscope.runner.driver import RunOptions


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_run(sub)
    _add_compare(sub)
    _add_report(sub)
    _add_serve_sim(sub)


def register_command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    """Only the parser of ``name`` (``rackscope.cli`` asks when the command line names it): the
    others' flags import what ``run`` does not need (the simulated GPUs' profiles, the verdicts)."""
    adders = {"run": _add_run, "compare": _add_compare, "report": _add_report, "serve-sim": _add_serve_sim}
    adders[name](sub)


# --- run ----------------------------------------------------------------------------------------
def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rackscope.cli import HelpFormatter

    p = sub.add_parser(
        "run",
        help="run a benchmark workload against an engine and write its record",
        formatter_class=HelpFormatter,
        description=(
            "Drive an engine through a scenario and report throughput, latency percentiles,\n"
            "energy and tokens per joule. Examples:\n\n"
            "  rackscope run --engine openai --url http://127.0.0.1:8000 --model llama2-70b \\\n"
            "      --scenario concurrency --concurrency 32 --requests 200 --output out.json\n"
            "  rackscope run --engine sim --gpu-model gb300 --gpus 4 --scenario offline \\\n"
            "      --duration 10 --warm-start --output out.json\n\n"
            "--warm-start starts the simulated engine in steady state. A cold offline start\n"
            "fills every batch at once and its requests then stay in step: the output rate\n"
            "swings in a cycle of about 23 s that fixed lengths never break up, so a 10 s\n"
            "window of a cold engine reads wherever in the swing it falls (about three\n"
            "quarters of what the engine sustains), whenever the warm-up ends.\n\n"
            "Exit status: 0 when the run completed, 1 when it stopped early (errors, a server\n"
            "that went away), 2 for bad flags, 130/143 after Ctrl-C/SIGTERM (a partial record\n"
            "is still written)."
        ),
    )
    from rackscope.runner.config import SETTINGS, add_flags
    from rackscope.runner.datasets import DEFAULT_DATASET_MAX_BYTES

    groups = {
        "engine": p.add_argument_group("engine"),
        "scenario": p.add_argument_group("scenario"),
        "dataset": p.add_argument_group("dataset"),
        "output": p.add_argument_group("output and telemetry"),
    }
    add_flags(groups.__getitem__, SETTINGS)
    e = groups["engine"]
    e.add_argument("--sim-variation", action="store_true",
                   help="apply the seeded per-node variation to the simulated GPUs (sim)")
    e.add_argument("--virtual-clock", action="store_true",
                   help="run the simulated engine on virtual time: a long run in moments (sim)")
    e.add_argument("--tp", type=int, default=1, help="tensor parallelism (trtllm, trtllm-bench)")
    e.add_argument("--device", default="cpu", help="torch device (hf)")
    e.add_argument("--dtype", default="auto", help="torch dtype (hf)")
    e.add_argument("--workdir", default=None, help="where trtllm-bench writes its dataset, log and report")
    groups["dataset"].add_argument(
        "--dataset-max-mib", type=int, default=DEFAULT_DATASET_MAX_BYTES // 2**20, metavar="MIB",
        help="largest --dataset file read, in MiB",
    )
    o = groups["output"]
    o.add_argument("--output", default=None, metavar="FILE",
                   help="run record JSON (per-request rows go to FILE's stem + .requests.jsonl)")
    o.add_argument("--otlp-endpoint", default=None, help="export workload metrics over OTLP/HTTP to this endpoint")
    o.add_argument("--metrics-port", type=int, default=None,
                   help="serve workload metrics for Prometheus on 127.0.0.1:PORT while the run lasts")
    p.set_defaults(func=run)


# --- compare ------------------------------------------------------------------------------------
def _add_compare(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rackscope.cli import HelpFormatter
    from rackscope.runner import verdict as v

    c = sub.add_parser(
        "compare",
        help="compare run or rack records and judge each metric's change against its noise",
        formatter_class=HelpFormatter,
        description=(
            "Compare run (or rack) records: output tokens/s, tokens/J and TTFT/TPOT p50/p99 each get\n"
            "the change with a confidence interval (seeded block bootstrap over the 1 s series and the\n"
            "per-request rows; several runs per side count their spread) and a verdict: regression\n"
            "(the whole interval beyond --threshold in the bad direction), improvement (beyond it in\n"
            "the good one), no change (within +-threshold) or inconclusive. Rack records are compared\n"
            "as a whole and node by node.\n\n"
            "  rackscope compare base.json new.json --threshold 5\n"
            "  rackscope compare --base a1.json a2.json --new b1.json b2.json --threshold 2\n\n"
            f"Exit status: {v.EXIT_OK} no regression, {v.EXIT_REGRESSION} a metric regressed (or valid/complete "
            f"turned false),\n{v.EXIT_USAGE} bad flags or unreadable records, {v.EXIT_INCONCLUSIVE} with "
            "--fail-inconclusive: none regressed\nbut a metric is inconclusive."
        ),
    )
    c.add_argument("records", nargs="*", default=[], metavar="BASE.json NEW.json",
                   help="one base and one new record (or --base and --new)")
    c.add_argument("--base", nargs="+", default=None, metavar="RECORD", help="base records (runs of the same setup)")
    c.add_argument("--new", nargs="+", default=None, metavar="RECORD", help="new records (runs of the same setup)")
    c.add_argument("--threshold", type=float, default=5.0, help="percent change that matters")
    c.add_argument("--confidence", type=float, default=v.DEFAULT_CONFIDENCE_PCT,
                   help="confidence level of the intervals, percent")
    c.add_argument("--resamples", type=int, default=v.DEFAULT_RESAMPLES, help="bootstrap replicates per side")
    c.add_argument("--seed", type=int, default=v.DEFAULT_SEED, help="seed of the bootstrap (same seed, same intervals)")
    c.add_argument("--fail-inconclusive", action="store_true",
                   help=f"exit {v.EXIT_INCONCLUSIVE} when no metric regressed but one is inconclusive")
    c.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    c.set_defaults(func=compare_main)


def compare_main(args: argparse.Namespace) -> int:
    from rackscope.runner.compare import main

    return main(args)


# --- report -------------------------------------------------------------------------------------
def _add_report(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rackscope.cli import HelpFormatter

    p = sub.add_parser(
        "report",
        help="plots and a Markdown summary of a run or rack record",
        formatter_class=HelpFormatter,
        description=(
            "Write PNG plots (throughput over time per node, latency CDFs, power against\n"
            "throughput, tokens per joule per node) and report.md beside them, from a run record\n"
            "(rackscope.run/1, with its .requests.jsonl) or a rack record (rackscope.rack/1, read\n"
            "inside its results bundle)."
        ),
    )
    p.add_argument("record", nargs="+",
                   help="run or rack record (JSON); several run records go on the same sweep charts (before/after)")
    p.add_argument("--output", default=None,
                   help="folder for the report (default: RECORD-report beside the (first) record)")
    p.set_defaults(func=report_main)


def report_main(args: argparse.Namespace) -> int:
    from rackscope.runner.report import write_report

    try:
        files = write_report(args.record, args.output)
    except ResultError as exc:
        print(f"rackscope report: error: {exc}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


# --- serve-sim ----------------------------------------------------------------------------------
def _add_serve_sim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rackscope.cli import HelpFormatter
    from rackscope.runner.serve_sim import DEFAULT_PORT
    from rackscope.simgpu import PROFILES

    parser = sub.add_parser(
        "serve-sim",
        help="serve a simulated Llama2-70B over an OpenAI-compatible HTTP API",
        description=(
            "Serve the simulated engine as an OpenAI-compatible server (a stand-in for\n"
            "trtllm-serve or vLLM): /v1/completions, /v1/chat/completions, /v1/models, /health,\n"
            "/metrics. Timing follows the chosen GPU's published Llama2-70B throughput.\n"
            "Prints the URL it serves on once listening; stops cleanly on SIGTERM or SIGINT."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--gpu-model", default="h100", choices=sorted(PROFILES), help="simulated GPU")
    parser.add_argument("--gpus", type=int, default=1, help="number of simulated GPUs behind the server")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (0: any free port)")
    parser.add_argument("--model", default="llama2-70b", help="model name served (requests must name it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated GPUs' variation")
    parser.add_argument("--node", default="n01", help="node name (seeds its throughput variation)")
    parser.add_argument(
        "--max-batch", type=int, default=None,
        help="requests per GPU batch (None: what each GPU's deployment is tuned for)",
    )
    parser.set_defaults(func=serve_sim_main)


def serve_sim_main(args: argparse.Namespace) -> int:
    from rackscope.runner.serve_sim import serve

    if args.gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {args.gpus}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_batch is not None and args.max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {args.max_batch}")
    asyncio.run(serve(gpu_model=args.gpu_model, gpus=args.gpus, host=args.host, port=args.port, model=args.model,
                      seed=args.seed, node=args.node, max_batch=args.max_batch))
    return 0


# --- run: flags to settings, and the command ------------------------------------------------------
def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> RunConfig:
    """Flags -> a validated ``RunConfig`` (``ConfigError`` for bad combinations)."""
    from rackscope.runner.config import SETTINGS, RunConfig, values_from_args
    from rackscope.runner.engines.registry import DEFAULT_SIM_GPUS, DEFAULT_SIM_MODEL, engine_spec

    env = dict(os.environ) if env is None else env
    data = values_from_args(args, SETTINGS)
    if data["requests"] is None and data["duration_s"] is None and data["dataset"] is None:
        raise ConfigError("say how long to run: --requests N and/or --duration SECONDS")
    engine = data["engine"]
    spec = engine_spec(engine)
    if data["model"] is None:
        if spec.needs_checkpoint:
            raise ConfigError(f"--engine {engine} needs --model (a checkpoint path or hub id)")
        data["model"] = spec.default_model
    if not spec.simulated and (args.virtual_clock or args.sim_variation):
        raise ConfigError("--virtual-clock and --sim-variation apply to --engine sim only")
    if engine != "openai" and data["url"] is not None:
        raise ConfigError("--url applies to --engine openai only")
    if args.dataset_max_mib < 1:
        raise ConfigError("--dataset-max-mib must be at least 1")
    if spec.simulated:
        data["gpus"] = data["gpus"] if data["gpus"] is not None else DEFAULT_SIM_GPUS
        data["gpu_model"] = data["gpu_model"] or DEFAULT_SIM_MODEL
    data["api_key"] = data["api_key"] or env.get("OPENAI_API_KEY") or None
    return RunConfig.from_dict(data)


def run_options(args: argparse.Namespace) -> RunOptions:
    """The flags of ``rackscope run`` that are not run settings."""
    from rackscope.runner.driver import RunOptions
    from rackscope.runner.engines.registry import EngineOptions

    return RunOptions(
        output=Path(args.output) if args.output else None,
        dataset_max_bytes=args.dataset_max_mib * 2**20,
        otlp_endpoint=args.otlp_endpoint,
        metrics_port=args.metrics_port,
        workdir=Path(args.workdir) if args.workdir else None,
        engine=EngineOptions(virtual_clock=args.virtual_clock, sim_variation=args.sim_variation, tp=args.tp,
                             device=args.device, dtype=args.dtype),
    )


def run(args: argparse.Namespace) -> int:
    from rackscope.runner.engines.registry import engine_spec
    from rackscope.urls import redact_in

    config = config_from_args(args)
    options = run_options(args)
    try:
        if not engine_spec(config.engine).streaming:
            from rackscope.runner.bench_run import run_bench

            return run_bench(config, options)
        from rackscope.runner.driver import drive
        from rackscope.runner.workers import run_client

        # This process is the client: uvloop (a streaming client's CPU per token is mostly the
        # event loop's) and no garbage-collector pauses under the timestamps.
        return run_client(drive(config, options))
    except RackscopeError as exc:
        # Engines build their messages from the real URL; what is printed hides its credentials.
        exc.args = tuple(redact_in(a, config.url) if isinstance(a, str) else a for a in exc.args)
        raise


__all__ = ["compare_main", "config_from_args", "parse_seconds", "parse_warmup", "register", "report_main", "run",
           "run_options", "serve_sim_main"]
