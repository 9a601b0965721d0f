"""``rackscope rack run`` (one synchronized run across agents) and ``rackscope demo`` (a
simulated rack on this machine)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rackscope.errors import ConfigError

if TYPE_CHECKING:
    from rackscope.rack.coordinator import RackRun

EXIT_SIGTERM = 143

# RunConfig fields a rack run forwards, by flag destination. Node identity (rack, node) and
# the GPU description come from each agent, never from the coordinator.
RUN_FIELDS = (
    "engine",
    "model",
    "scenario",
    "requests",
    "duration_s",
    "concurrency",
    "rate",
    "sweep",
    "sweep_over",
    "preset",
    "ttft_limit_s",
    "tpot_limit_s",
    "offline_inflight",
    "input_len",
    "output_len",
    "length_dist",
    "length_spread",
    "dataset",
    "dataset_format",
    "seed",
    "url",
    "api",
    "request_timeout_s",
)


def add_scenario_flags(p: argparse.ArgumentParser) -> None:
    """The workload flags of ``rackscope run`` that make sense for every node of a rack."""
    from rackscope.runner.cli import parse_seconds, parse_warmup
    from rackscope.runner.datasets import DISTRIBUTIONS, FILE_FORMATS
    from rackscope.runner.scenarios import APIS, ENGINES, PRESETS, SCENARIOS, SWEEP_OVER, RunConfig

    d = RunConfig(node="-")
    w = p.add_argument_group("workload (sent to every agent)")
    w.add_argument("--engine", choices=ENGINES, default=d.engine, help="engine each agent drives")
    w.add_argument("--model", default=d.model, help="model name")
    w.add_argument("--scenario", choices=SCENARIOS, default=d.scenario, help="benchmark scenario")
    w.add_argument(
        "--duration",
        dest="duration_s",
        type=parse_seconds,
        metavar="SECONDS",
        help="measured seconds per node, e.g. 60 or 5m (None: until --requests)",
    )
    w.add_argument("--requests", type=int, help="measured requests per node")
    w.add_argument(
        "--warmup",
        type=parse_warmup,
        default=("auto", 0.0),
        metavar="N|Ns|auto|0",
        help="warm-up excluded from results: N requests, N seconds (5s), auto (duration-bounded offline "
        "runs start measuring when the output rate stops climbing) or 0",
    )
    w.add_argument("--concurrency", type=int, help="requests in flight (concurrency scenario)")
    w.add_argument("--rate", type=float, help="arrivals per second per node (server scenario)")
    w.add_argument("--sweep", help="comma-separated points of a sweep, e.g. 1,8,64")
    w.add_argument("--sweep-over", choices=SWEEP_OVER, default=d.sweep_over, help="what a sweep varies")
    w.add_argument("--preset", choices=sorted(PRESETS), help="latency limits preset")
    w.add_argument("--ttft-limit", dest="ttft_limit_s", type=float, help="p99 TTFT limit, seconds")
    w.add_argument("--tpot-limit", dest="tpot_limit_s", type=float, help="p99 TPOT limit, seconds")
    w.add_argument("--offline-inflight", type=int, help="cap on requests in flight (offline; None: the engine's)")
    w.add_argument("--input-len", type=int, default=d.input_len, help="prompt tokens")
    w.add_argument("--output-len", type=int, default=d.output_len, help="output tokens")
    w.add_argument("--length-dist", choices=DISTRIBUTIONS, default=d.length_dist, help="length distribution")
    w.add_argument("--length-spread", type=float, default=d.length_spread, help="relative spread of lengths")
    w.add_argument("--dataset", help="dataset file, as a path on each agent's machine")
    w.add_argument("--dataset-format", choices=FILE_FORMATS, default=d.dataset_format, help="dataset format")
    w.add_argument("--seed", type=int, default=d.seed, help="workload seed")
    w.add_argument("--url", help="server URL for the openai engine, as each agent reaches it")
    w.add_argument("--api", choices=APIS, default=d.api, help="OpenAI API flavour")
    w.add_argument(
        "--request-timeout",
        dest="request_timeout_s",
        type=float,
        default=d.request_timeout_s,
        help="per-request timeout, seconds",
    )


def run_body(args: argparse.Namespace) -> dict[str, Any]:
    """The run config sent to every agent, validated here first so bad flags exit 2 before
    any agent is contacted."""
    from rackscope.runner.scenarios import RunConfig

    body = {name: getattr(args, name) for name in RUN_FIELDS if getattr(args, name, None) is not None}
    if args.requests is None and args.duration_s is None and args.dataset is None:
        raise ConfigError("say how long to run: --requests N and/or --duration SECONDS")
    kind, amount = args.warmup
    body["warmup_auto"] = kind == "auto"
    if kind == "requests":
        body["warmup_requests"] = int(amount)
    elif kind == "seconds":
        body["warmup_s"] = amount
    RunConfig.from_dict({**body, "rack": "r", "node": "n"})  # raises ConfigError
    return body


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rackscope.cli import HelpFormatter
    from rackscope.rack.coordinator import DEFAULT_LOST_AFTER_S, DEFAULT_POLL_INTERVAL_S, DEFAULT_STRAGGLER_THRESHOLD

    rack = sub.add_parser(
        "rack",
        help="coordinate runs across a rack of agents",
        formatter_class=HelpFormatter,
        description="Coordinate benchmark runs across the agents of a rack.",
    )
    rack_sub = rack.add_subparsers(dest="rack_command", metavar="COMMAND", required=True)
    p = rack_sub.add_parser(
        "run",
        help="one synchronized run across agents, aggregated into a rack record",
        formatter_class=HelpFormatter,
        description=(
            "Start the same run on every agent (over its control API) at a common start time, poll\n"
            "them, collect every node's record, per-request rows and log, and write a results\n"
            "bundle with the rack record (rackscope.rack/1).\n\n"
            "Exit status: 0 when every node completed, 1 when some node failed, 2 on bad flags."
        ),
    )
    a = p.add_argument_group("agents")
    a.add_argument("--agents", default=None, help="comma-separated agent URLs, e.g. http://n01:9470,http://n02:9470")
    a.add_argument("--agents-file", default=None, help="file with one agent URL per line (# comments)")
    a.add_argument("--token", default=None, help="API token for the agents (default: env RACKSCOPE_API_TOKEN)")
    add_scenario_flags(p)
    c = p.add_argument_group("coordination")
    c.add_argument("--output", default=None, help="results bundle folder (default: results/rack-TIME-ID)")
    c.add_argument("--run-id", default=None, help="run id used on every agent (default: random)")
    c.add_argument(
        "--lead-time",
        dest="lead_time_s",
        type=float,
        default=None,
        help="seconds between start-up and the common start (default: from the agents' answer times)",
    )
    c.add_argument(
        "--poll-interval",
        dest="poll_interval_s",
        type=float,
        default=DEFAULT_POLL_INTERVAL_S,
        help="seconds between status polls",
    )
    c.add_argument(
        "--lost-after",
        dest="lost_after_s",
        type=float,
        default=DEFAULT_LOST_AFTER_S,
        help="seconds an agent may stay unreachable mid-run before it is marked lost",
    )
    c.add_argument(
        "--timeout",
        dest="timeout_s",
        type=float,
        default=None,
        help="seconds after the start before a node still running is given up "
        "(default: 1.5 x --duration + 60 for timed runs, none otherwise)",
    )
    c.add_argument(
        "--straggler-threshold",
        type=float,
        default=DEFAULT_STRAGGLER_THRESHOLD,
        help="a node below this fraction of the median node is a straggler",
    )
    c.add_argument("--json", action="store_true", help="print the rack record to stdout (nothing else)")
    p.set_defaults(func=run_rack)

    from rackscope.rack.demo import register_demo

    register_demo(sub)


def run_rack(args: argparse.Namespace) -> int:
    import uuid

    from rackscope.rack.coordinator import RackRun, RackRunSpec, default_output_dir, exit_code, parse_agents
    from rackscope.runner.results import dumps

    agents = parse_agents(args.agents, args.agents_file)
    body = run_body(args)
    if args.timeout_s is not None and args.timeout_s <= 0:
        raise ConfigError("--timeout must be positive")
    rack_run_id = args.run_id or uuid.uuid4().hex[:12]
    output = Path(args.output) if args.output else default_output_dir(rack_run_id)
    spec = RackRunSpec(
        agents=agents,
        run=body,
        output_dir=output,
        token=args.token or os.environ.get("RACKSCOPE_API_TOKEN") or None,
        rack_run_id=rack_run_id,
        lead_time_s=args.lead_time_s,
        poll_interval_s=args.poll_interval_s,
        lost_after_s=args.lost_after_s,
        timeout_s=args.timeout_s,
        straggler_threshold=args.straggler_threshold,
    )
    try:
        record = asyncio.run(_run_until_signalled(RackRun(spec)))
    except asyncio.CancelledError:
        print(f"rackscope rack run: stopped by SIGTERM; what was collected is in {output}", file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print(f"rackscope rack run: interrupted; what was collected is in {output}", file=sys.stderr)
        raise
    if args.json:
        sys.stdout.buffer.write(dumps(record))
        sys.stdout.flush()
    else:
        from rackscope.rack.demo_view import summary_text

        print(summary_text(record, bundle=str(output)))
    return exit_code(record)


async def _run_until_signalled(coordinator: RackRun) -> dict[str, Any]:
    """SIGTERM stops the run the way Ctrl-C does: runs cancelled, the bundle kept."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coordinator.run())
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
