"""``rackscope agent``: run the node agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from rackscope.errors import ConfigError

log = logging.getLogger(__name__)

WORKLOADS = ("none", "offline", "server", "concurrency")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rackscope.agent.faults import FAULTS
    from rackscope.agent.settings import OTLP_PROTOCOLS, SOURCES, AgentSettings
    from rackscope.agent.sources import DCGM_DEADLINE_FRACTION
    from rackscope.cli import HelpFormatter
    from rackscope.engine_metrics.formats import FORMATS as ENGINE_METRICS_FORMATS
    from rackscope.simgpu import PROFILES

    d = AgentSettings(node="<hostname>")
    p = sub.add_parser(
        "agent",
        help="run the per-node agent (GPU telemetry, control API, workloads)",
        formatter_class=HelpFormatter,
        description=(
            "Sample the node's GPUs every interval and export power, energy, memory, NVLink and\n"
            "workload metrics through OpenTelemetry (OTLP) and a Prometheus endpoint.\n\n"
            "Each setting can also come from RACKSCOPE_<NAME> (e.g. RACKSCOPE_NODE) and, for OTLP,\n"
            "the standard OTEL_EXPORTER_OTLP_* variables; flags win over both.\n\n"
            "faults for --inject NAME[=VALUE][@GPU]:\n" + "\n".join(f"  {k:17} {v}" for k, v in FAULTS.items())
        ),
    )
    g = p.add_argument_group("GPUs")
    g.add_argument(
        "--source",
        choices=SOURCES,
        default=None,
        help=f"GPU source; auto uses NVML when a driver answers, else sim (default: {d.source})",
    )
    g.add_argument(
        "--gpu-model",
        choices=sorted(PROFILES),
        default=None,
        help=f"simulated GPU model, --source sim only (default: {d.gpu_model})",
    )
    g.add_argument("--gpus", type=int, default=None, help=f"simulated GPU count, --source sim only (default: {d.gpus})")
    g.add_argument(
        "--dcgm-url", default=None, help=f"dcgm-exporter endpoint, --source dcgm only (default: {d.dcgm_url})"
    )
    g.add_argument(
        "--dcgm-timeout",
        dest="dcgm_timeout_s",
        type=float,
        default=None,
        help=f"seconds one whole dcgm-exporter scrape may take, capped at {DCGM_DEADLINE_FRACTION:g} x --interval; "
        f"a slower scrape reports the GPUs down (default: {d.dcgm_timeout_s})",
    )
    g.add_argument(
        "--interval",
        dest="interval_s",
        type=float,
        default=None,
        help=f"sampling interval in seconds (default: {d.interval_s})",
    )
    g.add_argument("--seed", type=int, default=None, help=f"seed of the simulated node variation (default: {d.seed})")
    g.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="FAULT",
        help="inject a fault on the simulated GPUs at start, e.g. power-cap=700@0 (repeatable)",
    )
    m = p.add_argument_group("inference server")
    m.add_argument(
        "--engine-metrics",
        dest="engine_metrics_url",
        default=None,
        metavar="URL",
        help="the inference server's own metrics page, e.g. http://127.0.0.1:8000/metrics: running and "
        "waiting requests, KV-cache usage and server-counted tokens, exported beside the GPUs' "
        "(env RACKSCOPE_ENGINE_METRICS; default: the origin of a hosted openai run's server + /metrics, while it runs)",
    )
    m.add_argument(
        "--engine-metrics-format",
        dest="engine_metrics_format",
        choices=ENGINE_METRICS_FORMATS,
        default=None,
        help="the page's format (env RACKSCOPE_ENGINE_METRICS_FORMAT; default: detected from the page)",
    )
    i = p.add_argument_group("identity")
    i.add_argument("--rack", default=None, help=f"rack name (default: {d.rack})")
    i.add_argument("--node", default=None, help="node name (default: the host name)")
    e = p.add_argument_group("export")
    e.add_argument("--metrics-host", default=None, help=f"Prometheus endpoint address (default: {d.metrics_host})")
    e.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help=f"Prometheus endpoint port, 0 for any free port (default: {d.metrics_port})",
    )
    e.add_argument("--no-metrics", action="store_true", help="serve no Prometheus endpoint (OTLP only)")
    e.add_argument(
        "--otlp-endpoint",
        default=None,
        help="OTLP endpoint, e.g. http://collector:4318 (http/protobuf) or http://collector:4317 (grpc); "
        "default: OTEL_EXPORTER_OTLP_ENDPOINT, else no OTLP export",
    )
    e.add_argument(
        "--otlp-protocol", choices=OTLP_PROTOCOLS, default=None, help=f"OTLP protocol (default: {d.otlp_protocol})"
    )
    e.add_argument(
        "--otlp-interval",
        dest="otlp_interval_s",
        type=float,
        default=None,
        help=f"OTLP export interval in seconds (default: {d.otlp_interval_s})",
    )
    a = p.add_argument_group("control API")
    a.add_argument("--api-host", default=None, help=f"control API address (default: {d.api_host})")
    a.add_argument(
        "--api-port", type=int, default=None, help=f"control API port, 0 for any free port (default: {d.api_port})"
    )
    a.add_argument("--no-api", action="store_true", help="serve no control API")
    a.add_argument(
        "--api-token",
        default=None,
        help="token required on mutating API calls (env RACKSCOPE_API_TOKEN); mandatory off loopback. "
        "A flag's value is visible to every local user in `ps`: prefer --api-token-file",
    )
    a.add_argument(
        "--api-token-file",
        default=None,
        metavar="FILE",
        help="read the API token from FILE once at start, surrounding whitespace stripped "
        "(env RACKSCOPE_API_TOKEN_FILE); keep it chmod 600",
    )
    a.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="directory whose files API-started runs may name as their dataset (env RACKSCOPE_DATA_DIR); "
        "without it the API refuses every dataset path",
    )
    a.add_argument(
        "--dataset-max-mib",
        type=int,
        default=None,
        metavar="MIB",
        help=f"largest dataset file an API-started run may read (env RACKSCOPE_DATASET_MAX_MIB; "
        f"default: {d.dataset_max_mib})",
    )
    w = p.add_argument_group("workload")
    w.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="none",
        help="run a benchmark workload continuously on the simulated GPUs until stopped",
    )
    w.add_argument("--concurrency", type=int, default=256, help="requests in flight for --workload concurrency")
    w.add_argument("--rate", type=float, default=None, help="arrivals per second for --workload server")
    w.add_argument(
        "--results-dir", default=None, help="where API-started runs write their records (default: ./results)"
    )
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Any:
    from rackscope.agent.settings import ENV_VARS, resolve
    from rackscope.runner.config import SETTINGS, check

    given: dict[str, Any] = {name: getattr(args, name, None) for name in ENV_VARS}
    if getattr(args, "no_metrics", False):
        given["metrics_enabled"] = False
    if getattr(args, "no_api", False):
        given["api_enabled"] = False
    settings = resolve(given, os.environ if env is None else env)
    sim_only = [
        flag
        for flag, name in (("--gpu-model", "gpu_model"), ("--gpus", "gpus"), ("--inject", "inject"))
        if getattr(args, name, None)
    ]
    if settings.source in ("nvml", "dcgm") and sim_only:
        raise ConfigError(
            f"{', '.join(sim_only)} only apply to --source sim (this run uses --source {settings.source})"
        )
    if settings.source in ("nvml", "dcgm") and args.workload != "none":
        raise ConfigError(
            "--workload drives simulated GPUs; on real GPUs start runs through the API or `rackscope run`"
        )
    if args.dcgm_url and settings.source != "dcgm":
        raise ConfigError("--dcgm-url only applies to --source dcgm")
    if args.workload == "server" and not args.rate:
        raise ConfigError("--workload server needs --rate (arrivals per second)")
    for name in ("concurrency", "rate"):
        if getattr(args, name) is not None:
            check(SETTINGS[name], getattr(args, name))
    return settings


def run(args: argparse.Namespace) -> int:
    from rackscope.agent.faults import parse_fault

    settings = settings_from_args(args)
    faults = [parse_fault(spec) for spec in args.inject]
    try:
        return asyncio.run(_serve(settings, faults, args))
    except OSError as exc:  # typically a port already in use
        print(f"rackscope agent: error: {exc}", file=sys.stderr)
        return 1


async def _serve(settings: Any, faults: list[Any], args: argparse.Namespace) -> int:
    from rackscope.agent.node import NodeAgent
    from rackscope.agent.sources import open_source
    from rackscope.clock import WallClock

    clock = WallClock()
    source, infos, sim_gpus = open_source(settings, clock)
    agent = NodeAgent(settings, source, infos, sim_gpus=sim_gpus, clock=clock)
    if args.results_dir:
        agent.runs.results_dir = args.results_dir
    if faults and sim_gpus is None:
        raise ConfigError("--inject needs simulated GPUs (--source sim)")
    for fault in faults:
        agent.inject(fault)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ready = asyncio.Event()
    serving = asyncio.create_task(agent.serve(stop, ready))
    ready_wait = asyncio.create_task(ready.wait())
    await asyncio.wait({serving, ready_wait}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        ready_wait.cancel()
        await serving  # raises what stopped it
        return 1
    # One machine-readable line so scripts (and tests) can find ephemeral ports.
    print(
        f"rackscope agent ready metrics_port={agent.telemetry.metrics_port or 0} api_port={agent.api_port or 0}",
        file=sys.stderr,
        flush=True,
    )
    if args.workload != "none":
        agent.runs.start_continuous(args.workload, concurrency=args.concurrency, rate=args.rate)
    await serving
    log.info("agent stopped")
    return 0
