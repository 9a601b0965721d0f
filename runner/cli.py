"""``rackscope run`` (drive a benchmark and write its record) and ``rackscope compare``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rackscope.errors import ConfigError, ResultError

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

    from rackscope.clock import Clock
    from rackscope.runner.engines.base import Engine
    from rackscope.runner.results import RunResult
    from rackscope.runner.scenarios import EnergyMeter, RunConfig

log = logging.getLogger(__name__)

EXIT_INCOMPLETE = 1
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
DEFAULT_SIM_GPUS = 4
DEFAULT_SIM_MODEL = "gb300"
_SECONDS = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {None: 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0, "h": 3600.0}


def parse_seconds(text: str) -> float:
    """``"10"``, ``"10s"``, ``"450ms"``, ``"5m"`` -> seconds."""
    m = _SECONDS.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 10, 10s, 450ms, 5m)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_warmup(text: str) -> tuple[str, float]:
    """``auto`` | ``0``/``none`` | ``N`` requests | ``Ns`` seconds."""
    t = text.strip().lower()
    if t == "auto":
        return "auto", 0.0
    if t in ("0", "none", "off"):
        return "none", 0.0
    if t.isdigit():
        return "requests", float(int(t))
    try:
        return "seconds", parse_seconds(t)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"--warmup takes a request count (20), a duration (5s), auto or 0, not {text!r}"
        ) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
            "      --duration 10 --output out.json\n\n"
            "Exit status: 0 when the run completed, 1 when it stopped early (errors, a server\n"
            "that went away), 2 for bad flags, 130/143 after Ctrl-C/SIGTERM (a partial record\n"
            "is still written)."
        ),
    )
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=("sim", "openai", "trtllm", "trtllm-bench", "hf"), default="sim",
                   help="what serves the requests")
    e.add_argument("--model", default=None,
                   help="model name (sim: llama2-70b; openai: the server's first model when left out; "
                        "trtllm/hf: a checkpoint path or hub id)")
    e.add_argument("--url", default=None, help="OpenAI-compatible server root, e.g. http://127.0.0.1:8000 (openai)")
    e.add_argument("--api", choices=("completions", "chat"), default="completions", help="which OpenAI API (openai)")
    e.add_argument("--api-key", default=None, help="bearer token (openai); default: the OPENAI_API_KEY variable")
    e.add_argument("--request-timeout", type=parse_seconds, default=600.0, metavar="SECONDS",
                   help="longest silence from the server before a request fails (openai)")
    e.add_argument("--workers", type=int, default=1, help="client processes sharing the load (openai)")
    e.add_argument("--gpu-model", default=None,
                   help=f"simulated GPU model (sim; default {DEFAULT_SIM_MODEL}) or a label for the record")
    e.add_argument("--gpus", type=int, default=None,
                   help=f"GPUs behind the engine (sim: how many to simulate, default {DEFAULT_SIM_GPUS}); "
                        "gives per-GPU throughput")
    e.add_argument("--sim-variation", action="store_true",
                   help="apply the seeded per-node variation to the simulated GPUs (sim)")
    e.add_argument("--virtual-clock", action="store_true",
                   help="run the simulated engine on virtual time: a long run in moments (sim)")
    e.add_argument("--tp", type=int, default=1, help="tensor parallelism (trtllm, trtllm-bench)")
    e.add_argument("--device", default="cpu", help="torch device (hf)")
    e.add_argument("--dtype", default="auto", help="torch dtype (hf)")
    e.add_argument("--workdir", default=None, help="where trtllm-bench writes its dataset, log and report")

    s = p.add_argument_group("scenario")
    s.add_argument("--scenario", choices=("offline", "server", "concurrency", "sweep"), default="offline",
                   help="load pattern")
    s.add_argument("--requests", type=int, default=None, help="measured requests (first bound reached ends the run)")
    s.add_argument("--duration", type=parse_seconds, default=None, metavar="SECONDS",
                   help="measured seconds (first bound reached ends the run)")
    s.add_argument("--warm-start", action="store_true",
                   help="sim engine: start in steady state, as if it had been serving (skips the cold ramp)")
    s.add_argument("--warmup", type=parse_warmup, default=("auto", 0.0), metavar="N|Ns|auto|0",
                   help="warm-up excluded from results: N requests, N seconds (5s), auto (duration-bounded "
                        "offline runs start measuring when the output rate stops climbing) or 0")
    s.add_argument("--concurrency", type=int, default=None, help="requests in flight (concurrency)")
    s.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (server)")
    s.add_argument("--sweep", default=None, metavar="LIST",
                   help="comma-separated concurrencies (or rates with --sweep-over rate), e.g. 1,8,64 (sweep)")
    s.add_argument("--sweep-over", choices=("concurrency", "rate"), default="concurrency", help="what --sweep lists")
    s.add_argument("--preset", choices=("server", "interactive"), default=None,
                   help="MLPerf latency limits: server 2 s / 200 ms, interactive 450 ms / 40 ms (p99 TTFT / TPOT)")
    s.add_argument("--ttft-limit", type=parse_seconds, default=None, metavar="SECONDS",
                   help="p99 time-to-first-token limit, e.g. 2s or 450ms (default: from the preset)")
    s.add_argument("--tpot-limit", type=parse_seconds, default=None, metavar="SECONDS",
                   help="p99 time-per-output-token limit, e.g. 200ms (default: from the preset)")
    s.add_argument("--offline-inflight", type=int, default=None,
                   help="cap on requests in flight in offline runs (default: engine dependent)")
    s.add_argument("--max-consecutive-errors", type=int, default=20,
                   help="stop the run (incomplete) after this many failed requests in a row")
    s.add_argument("--seed", type=int, default=0, help="seed of arrivals and synthetic lengths")

    d = p.add_argument_group("dataset")
    d.add_argument("--dataset", default=None, metavar="FILE", help="prompt file (default: synthetic prompts)")
    d.add_argument("--dataset-format", choices=("jsonl", "trtllm"), default="jsonl",
                   help='jsonl: {"prompt", "max_tokens"|"output_tokens"}; trtllm: trtllm-bench lines')
    d.add_argument("--input-len", type=int, default=None, help="mean synthetic prompt length in tokens (684)")
    d.add_argument("--output-len", type=int, default=None, help="mean synthetic output length in tokens (294)")
    d.add_argument("--length-dist", choices=("fixed", "uniform", "normal", "lognormal"), default="fixed",
                   help="distribution of synthetic lengths around the means")
    d.add_argument("--length-spread", type=float, default=0.25,
                   help="half-width (uniform) or coefficient of variation (normal, lognormal) of the lengths")

    o = p.add_argument_group("output and telemetry")
    o.add_argument("--output", default=None, metavar="FILE",
                   help="run record JSON (per-request rows go to FILE's stem + .requests.jsonl)")
    o.add_argument("--run-id", default=None, help="run identifier (default: random)")
    o.add_argument("--rack", default="r1", help="rack label on the record and metrics")
    o.add_argument("--node", default=None, help="node label (default: the host name)")
    o.add_argument("--otlp-endpoint", default=None, help="export workload metrics over OTLP/HTTP to this endpoint")
    o.add_argument("--metrics-port", type=int, default=None,
                   help="serve workload metrics for Prometheus on 127.0.0.1:PORT while the run lasts")
    p.set_defaults(func=run)

    c = sub.add_parser(
        "compare",
        help="compare two records and flag regressions",
        formatter_class=HelpFormatter,
        description=(
            "Side-by-side table of two run (or rack) records. Exit status: 0 no regression, 1 NEW\n"
            "regresses beyond the threshold (throughput or tokens/J down, latency up, valid ->\n"
            "invalid), 2 unreadable input."
        ),
    )
    c.add_argument("base", metavar="BASE.json")
    c.add_argument("new", metavar="NEW.json")
    c.add_argument("--threshold", type=float, default=5.0, help="percent change that counts as a regression")
    c.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    c.set_defaults(func=compare_main)


# --- run ----------------------------------------------------------------------------------------
def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> RunConfig:
    """Flags -> a validated ``RunConfig`` (``ConfigError`` for bad combinations)."""
    from rackscope.runner.scenarios import RunConfig

    env = dict(os.environ) if env is None else env
    if args.requests is None and args.duration is None and args.dataset is None:
        raise ConfigError("say how long to run: --requests N and/or --duration SECONDS")
    kind, amount = args.warmup
    model = args.model
    if model is None:
        if args.engine in ("trtllm", "trtllm-bench", "hf"):
            raise ConfigError(f"--engine {args.engine} needs --model (a checkpoint path or hub id)")
        model = "llama2-70b" if args.engine == "sim" else ""
    if args.engine != "sim" and (args.virtual_clock or args.sim_variation):
        raise ConfigError("--virtual-clock and --sim-variation apply to --engine sim only")
    if args.engine != "openai" and args.url is not None:
        raise ConfigError("--url applies to --engine openai only")
    data: dict[str, Any] = {
        "engine": args.engine,
        "model": model,
        "scenario": args.scenario,
        "requests": args.requests,
        "duration_s": args.duration,
        "warmup_requests": int(amount) if kind == "requests" else 0,
        "warmup_s": amount if kind == "seconds" else 0.0,
        "warmup_auto": kind == "auto",
        "sim_warm_start": args.warm_start or None,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "sweep": args.sweep or (),
        "sweep_over": args.sweep_over,
        "preset": args.preset,
        "ttft_limit_s": args.ttft_limit,
        "tpot_limit_s": args.tpot_limit,
        "offline_inflight": args.offline_inflight,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "length_dist": args.length_dist,
        "length_spread": args.length_spread,
        "dataset": args.dataset,
        "dataset_format": args.dataset_format,
        "seed": args.seed,
        "rack": args.rack,
        "node": args.node,
        "gpus": args.gpus if args.gpus is not None else (DEFAULT_SIM_GPUS if args.engine == "sim" else None),
        "gpu_model": args.gpu_model or (DEFAULT_SIM_MODEL if args.engine == "sim" else None),
        "workers": args.workers,
        "url": args.url,
        "api": args.api,
        "api_key": args.api_key or env.get("OPENAI_API_KEY") or None,
        "request_timeout_s": args.request_timeout,
        "max_consecutive_errors": args.max_consecutive_errors,
        "run_id": args.run_id,
    }
    return RunConfig.from_dict(data)


@dataclass
class Built:
    engine: Engine
    energy: EnergyMeter | None = None
    clock: Clock | None = None
    details: dict[str, Any] = field(default_factory=dict)


def build_engine(config: RunConfig, args: argparse.Namespace) -> Built:
    """The engine a config names; optional engines are imported only when asked for."""
    if config.engine == "sim":
        from rackscope.clock import VirtualClock, WallClock
        from rackscope.runner.engines.sim import SimEngine
        from rackscope.runner.scenarios import SimEnergyMeter
        from rackscope.simgpu import SimGpu, make_node_gpus, profile

        clock: Clock = VirtualClock() if args.virtual_clock else WallClock()
        gpu_model = config.gpu_model or DEFAULT_SIM_MODEL
        count = config.gpus or DEFAULT_SIM_GPUS
        try:
            prof = profile(gpu_model)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if args.sim_variation:
            gpus = make_node_gpus(gpu_model, count, clock, rack=config.rack, node=config.node, seed=config.seed)
        else:
            gpus = [SimGpu(i, prof, clock) for i in range(count)]
        engine = SimEngine(gpus, clock, model=config.model, warm_start=config.sim_warm_start, seed=config.seed)
        return Built(engine, SimEnergyMeter(gpus, config.node), clock if args.virtual_clock else None)
    if config.engine == "openai":
        from rackscope.runner.engines.openai import OpenAIEngine

        assert config.url is not None
        try:
            oa = OpenAIEngine(
                config.url, config.model, "chat" if config.api == "chat" else "completions", config.api_key,
                timeout_s=config.request_timeout_s,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return Built(oa)
    if config.engine == "trtllm":
        module = _optional("rackscope.runner.engines.trtllm", "trtllm")
        return Built(module.TrtllmEngine(config.model, tp=args.tp))
    if config.engine == "hf":
        module = _optional("rackscope.runner.engines.hf", "hf")
        try:
            hf = module.HfEngine(config.model, device=args.device, dtype=args.dtype)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return Built(hf)
    raise ConfigError(f"engine {config.engine!r} is not a streaming engine")


def _optional(name: str, engine: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise ConfigError(f"--engine {engine} is not available in this build ({name} is missing)") from exc
        raise


class _Signals:
    """Ctrl-C / SIGTERM set the cancel event (a partial record is written); a second one
    falls back to the default handler and ends the process at once."""

    def __init__(self, cancel: asyncio.Event, also: threading.Event | None = None) -> None:
        self.cancel = cancel
        self.also = also  # a thread-side flag to raise as well (worker processes)
        self.received: int | None = None
        self._loop = asyncio.get_running_loop()
        self._installed: list[int] = []

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._loop.add_signal_handler(sig, self._on_signal, sig)
                self._installed.append(sig)
            except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
                pass
        return self

    def _on_signal(self, sig: int) -> None:
        if self.received is None:
            self.received = sig
            log.warning("%s received: stopping the run and writing a partial record", signal.Signals(sig).name)
            self.cancel.set()
            if self.also is not None:
                self.also.set()
            return
        self.__exit__()
        signal.raise_signal(sig)

    def __exit__(self, *exc: object) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)
        self._installed.clear()


def _meter_provider(args: argparse.Namespace) -> MeterProvider | None:
    """An SDK meter provider, only when metrics export was asked for (the agent is the usual host)."""
    if args.otlp_endpoint is None and args.metrics_port is None:
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    readers: list[MetricReader] = []
    if args.otlp_endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        endpoint = args.otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/metrics"):
            endpoint += "/v1/metrics"
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint), 5000))
    if args.metrics_port is not None:
        try:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server
        except ImportError as exc:
            raise ConfigError(
                "--metrics-port needs opentelemetry-exporter-prometheus (pip install rackscope[dev]); "
                "or run under the agent, which serves /metrics itself"
            ) from exc
        start_http_server(args.metrics_port, addr="127.0.0.1")
        readers.append(PrometheusMetricReader())
    return MeterProvider(metric_readers=readers, resource=Resource.create({"service.name": "rackscope-run"}))


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if config.engine == "trtllm-bench":
        return _run_trtllm_bench(config, args)
    return asyncio.run(_run(config, args))


async def _run(config: RunConfig, args: argparse.Namespace) -> int:
    import dataclasses

    from rackscope.runner.progress import terminal_progress
    from rackscope.runner.scenarios import make_dataset, run_scenario

    if config.workers > 1:
        return await _run_workers(config, args)
    dataset = make_dataset(config)  # a bad dataset file fails before anything starts
    if args.output:
        _check_output(Path(args.output))
    built = build_engine(config, args)
    engine = built.engine
    await engine.start()  # EngineUnavailable: reported by the CLI, no record written
    provider = _meter_provider(args)
    if engine.model and engine.model != config.model:
        config = dataclasses.replace(config, model=engine.model)
    progress = terminal_progress(sys.stderr)
    cancel = asyncio.Event()
    try:
        with _Signals(cancel) as signals:
            result = await run_scenario(
                engine, config, clock=built.clock, energy=built.energy,
                meter=provider.get_meter("rackscope.runner") if provider is not None else None,
                progress=progress, cancel=cancel, dataset=dataset,
            )
    finally:
        if progress is not None:
            progress.close()
        await engine.stop()
        if provider is not None:
            provider.shutdown()
    return await _finish(result, args, signals.received)


async def _run_workers(config: RunConfig, args: argparse.Namespace) -> int:
    """The openai engine over several client processes (``runner.workers``)."""
    import dataclasses

    from rackscope.runner.scenarios import make_dataset, run_with_workers

    dataset = make_dataset(config)
    if args.output:
        _check_output(Path(args.output))
    built = build_engine(config, args)  # check the server here first: one clear error, no workers
    await built.engine.start()
    if built.engine.model and built.engine.model != config.model:
        config = dataclasses.replace(config, model=built.engine.model)
    await built.engine.stop()
    provider = _meter_provider(args)
    stop = threading.Event()
    cancel = asyncio.Event()
    try:
        with _Signals(cancel, also=stop) as signals:
            result = await asyncio.to_thread(
                run_with_workers, config, stop=stop, dataset=dataset,
                meter=provider.get_meter("rackscope.runner") if provider is not None else None,
            )
    finally:
        if provider is not None:
            provider.shutdown()
    return await _finish(result, args, signals.received)


async def _finish(result: RunResult, args: argparse.Namespace, received: int | None) -> int:
    """Write the record (even a partial one), print the summary, pick the exit code."""
    from rackscope.runner.results import write_run

    if args.output:
        path = await asyncio.to_thread(write_run, result, args.output)
        print(f"record written to {path}", file=sys.stderr)
    print(format_summary(result))
    if received is not None:
        return EXIT_SIGINT if received == signal.SIGINT else EXIT_SIGTERM
    return 0 if result.complete else EXIT_INCOMPLETE


def _check_output(path: Path) -> None:
    """Fail before the run, not after it, when the record could not be written."""
    if path.is_dir():
        raise ConfigError(f"--output {path} is a directory; give a file name such as {path / 'run.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--output: cannot create {path.parent}: {exc.strerror or exc}") from exc
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"--output: {path.parent} is not writable")


def _run_trtllm_bench(config: RunConfig, args: argparse.Namespace) -> int:
    """trtllm-bench runs the whole benchmark itself; its report becomes the record's summary."""
    import tempfile

    from rackscope.runner.results import environment, now_utc, utc_iso, write_json
    from rackscope.runner.scenarios import make_dataset

    module = _optional("rackscope.runner.engines.trtllm_bench", "trtllm-bench")
    if config.scenario not in ("offline", "concurrency"):
        raise ConfigError("--engine trtllm-bench runs the offline or concurrency scenario only")
    if config.duration_s is not None:
        raise ConfigError("--engine trtllm-bench takes --requests, not --duration")
    if args.output:
        _check_output(Path(args.output))
    dataset = make_dataset(config, content="ids")
    count = config.requests or len(dataset)
    requests = [dataset.request(i, str(i)) for i in range(count)]
    bench = module.TrtllmBenchRunner(
        config.model, tp=args.tp, concurrency=config.concurrency if config.scenario == "concurrency" else None
    )
    started = now_utc()
    if args.workdir:
        summary = bench.run(requests, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="rackscope-trtllm-bench-") as tmp:
            summary = bench.run(requests, Path(tmp))
    record = trtllm_bench_record(summary, config, started_iso=utc_iso(started), ended_iso=utc_iso(now_utc()),
                                 env=environment(engine="trtllm-bench", model=config.model,
                                                 gpu_models=[config.gpu_model] if config.gpu_model else [],
                                                 records=[], extra={"simulated": False}))
    if args.output:
        write_json(Path(args.output), record)
    print(f"output tokens/s: {summary.get('output_tokens_per_s')}")
    return 0


def trtllm_bench_record(
    summary: dict[str, Any], config: RunConfig, *, started_iso: str, ended_iso: str, env: dict[str, Any]
) -> dict[str, Any]:
    """A ``rackscope.run/1`` record around a trtllm-bench summary (no per-request rows)."""
    from rackscope.runner.results import SCHEMA, distribution

    empty = distribution([])
    s = dict(summary)
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        s[key] = s.get(key) or dict(empty)
    s["itl_s"] = dict(s["tpot_s"])
    s["itl_method"] = "tpot"
    s.setdefault("complete", True)
    s.setdefault("stop_reason", "requests")
    s.setdefault("requests_failed", 0)
    s.setdefault("requests_failed_by_error", {})
    s.setdefault("requests_cancelled", 0)
    s.setdefault("gpus", config.gpus)
    s.setdefault("energy_j", None)
    s.setdefault("output_tokens_per_j", None)
    env = {**env, "output_tokens_method": "engine", "trtllm_bench": s.pop("trtllm_bench", None)}
    return {
        "schema": SCHEMA, "run_id": config.run_id, "started_at": started_iso, "ended_at": ended_iso, "error": None,
        "config": config.to_dict(), "environment": env, "summary": s, "per_gpu": [], "per_node": [],
        "timeseries": None, "points": [], "requests_file": None,
    }


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1e3:,.1f}"


def format_summary(result: RunResult) -> str:
    """A short human summary of a run for the terminal."""
    s = result.summary
    cfg = result.config
    lines = [
        f"run {result.run_id}: {cfg['engine']} {cfg['model']} {cfg['scenario']}"
        + ("" if s["complete"] else f"  INCOMPLETE ({s['stop_reason']})"),
        f"  duration         {s['duration_s']:.2f} s",
        f"  requests         {s['requests_completed']:,} completed, {s['requests_failed']:,} failed"
        + (f" {s['requests_failed_by_error']}" if s["requests_failed"] else "")
        + (f", {s['requests_cancelled']:,} stopped" if s["requests_cancelled"] else ""),
        f"  output tokens/s  {s['output_tokens_per_s']:,.1f}"
        + (f"  ({s['output_tokens_per_s_per_gpu']:,.1f} per GPU)" if s["output_tokens_per_s_per_gpu"] else ""),
    ]
    if s["energy_j"] is not None:
        lines.append(
            f"  energy           {s['energy_j']:,.0f} J, {s['average_power_w']:,.0f} W, "
            f"{s['output_tokens_per_j']:.3f} tokens/J"
        )
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        d = s[key]
        lines.append(f"  {name:<5} ms p50/p90/p99  {_ms(d['p50'])} / {_ms(d['p90'])} / {_ms(d['p99'])}")
    if "validity" in s:
        lines.append(
            f"  {s['validity']} (p99 TTFT <= {s['ttft_limit_s'] * 1e3:g} ms, "
            f"p99 TPOT <= {s['tpot_limit_s'] * 1e3:g} ms); goodput {s['goodput_requests_per_s']:.2f} req/s"
            + (f"; {'; '.join(s['validity_reasons'])}" if s["validity_reasons"] else "")
        )
    return "\n".join(lines)


# --- compare ------------------------------------------------------------------------------------
def compare_main(args: argparse.Namespace) -> int:
    import orjson

    from rackscope.runner.compare import compare, load_comparable, render

    try:
        base = load_comparable(args.base)
        new = load_comparable(args.new)
    except (ResultError, ConfigError) as exc:
        print(f"rackscope compare: error: {exc}", file=sys.stderr)
        return 2
    rows = compare(base, new, args.threshold)
    if args.format == "json":
        out: list[dict[str, Any]] = [
            {"metric": r.metric.key, "label": r.label, "base": r.base, "new": r.new,
             "change_pct": r.change_pct, "verdict": r.verdict}
            for r in rows
        ]
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(rows, Path(args.base).name, Path(args.new).name, args.threshold))
    return 1 if any(r.regressed for r in rows) else 0


__all__ = ["build_engine", "config_from_args", "format_summary", "parse_seconds", "register", "run"]
