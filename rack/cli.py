"""``rackscope rack run`` (one synchronized run across agents), ``rack task`` and ``rack collect``
(a rack run that a scheduler such as Slurm or Kubernetes starts, one task per node) and
``rackscope demo`` (a simulated rack on this machine)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rackscope.errors import ConfigError
from rackscope.runner.config import add_flags, rack_settings, values_from_args

if TYPE_CHECKING:
    from rackscope.rack.coordinator import RackRun

# A signal stops the run the same way whichever it is; the exit status says which (128 + N).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# RunConfig fields a rack run forwards (declared in runner.config). Node identity (rack, node)
# and the GPU description come from each agent, never from the coordinator.
RUN_FIELDS = rack_settings()


def add_scenario_flags(p: argparse.ArgumentParser) -> None:
    """The workload flags of ``rackscope run`` that make sense for every node of a rack: the
    same flags, parsers, bounds and choices, from the one declaration."""
    w = p.add_argument_group("workload (sent to every agent)")
    add_flags(lambda _group: w, RUN_FIELDS)


def run_body(args: argparse.Namespace) -> dict[str, Any]:
    """The run config sent to every agent, validated here first so bad flags exit 2 before
    any agent is contacted."""
    from rackscope.runner.config import RunConfig

    given = values_from_args(args, RUN_FIELDS)
    body = {name: list(v) if isinstance(v, tuple) else v for name, v in given.items() if v is not None and v != ()}
    if args.requests is None and args.duration_s is None and args.dataset is None:
        raise ConfigError("say how long to run: --requests N and/or --duration SECONDS")
    RunConfig.from_dict({**body, "rack": "r", "node": "n"})  # raises ConfigError
    return body


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rackscope.cli import HelpFormatter
    from rackscope.rack.spec import (
        DEFAULT_CALL_TIMEOUT_S,
        DEFAULT_COLLECT_TIMEOUT_S,
        DEFAULT_LOST_AFTER_S,
        DEFAULT_POLL_INTERVAL_S,
        DEFAULT_STRAGGLER_THRESHOLD,
    )

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
        "--call-timeout",
        dest="call_timeout_s",
        type=float,
        default=DEFAULT_CALL_TIMEOUT_S,
        help="seconds each call to an agent (probe, start, poll, cancel, log) may take, answer and all; "
        "an agent that takes longer is marked failed, naming the call",
    )
    c.add_argument(
        "--collect-timeout",
        dest="collect_timeout_s",
        type=float,
        default=DEFAULT_COLLECT_TIMEOUT_S,
        help="seconds a finished node's record, and separately its per-request rows, may take to download",
    )
    c.add_argument(
        "--straggler-threshold",
        type=float,
        default=DEFAULT_STRAGGLER_THRESHOLD,
        help="a node below this fraction of the median node is a straggler",
    )
    c.add_argument("--json", action="store_true", help="print the rack record to stdout (nothing else)")
    p.set_defaults(func=run_rack)
    _register_task(rack_sub)
    _register_collect(rack_sub)
    _register_demo(sub)


def _run_parser() -> argparse.ArgumentParser:
    """The parser of ``rackscope run`` itself, so a rack task takes exactly its flags."""
    from rackscope.runner import cli as runner_cli

    commands = argparse.ArgumentParser(add_help=False).add_subparsers()
    runner_cli.register(commands)
    return commands.choices["run"]


# How a rack task's identity flags differ from those of ``rackscope run`` (rack/identity.py).
_TASK_IDENTITY_HELP = {
    "rack": "rack label (default: RACKSCOPE_RACK; never guessed)",
    "node": "node label (default: RACKSCOPE_NODE, else SLURMD_NODENAME); see --node-from",
    "run_id": "run id, the same on every task (default: RACKSCOPE_RUN_ID, else slurm-JOBID-STEPID under srun)",
}


def _register_task(rack_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rackscope.cli import HelpFormatter
    from rackscope.rack.task import add_task_flags, run_task

    p = rack_sub.add_parser(
        "task",
        parents=[_run_parser()],
        add_help=False,  # the run parser's -h comes with its flags
        help="one node's part of a rack run started by a scheduler (srun, a Kubernetes Indexed Job)",
        formatter_class=HelpFormatter,
        description=(
            "Run this node's part of a rack run that a scheduler started, one task per node:\n"
            "take the task's rank, node and run id from the scheduler (Slurm: SLURM_PROCID,\n"
            "SLURM_NTASKS, SLURMD_NODENAME, SLURM_JOB_ID; Kubernetes: JOB_COMPLETION_INDEX) unless\n"
            "flags or RACKSCOPE_* variables say otherwise, start the engine, wait at a start barrier\n"
            "in the shared --results folder until every task is ready, start together, and write\n"
            "the node's record there. Then `rackscope rack collect RESULTS` builds the rack record.\n\n"
            "  srun rackscope rack task --results results/$SLURM_JOB_ID --rack r1 \\\n"
            "      --engine openai --url http://127.0.0.1:8000 --scenario offline --duration 10m\n\n"
            "Every flag of `rackscope run` is taken, except --output.\n\n"
            "Exit status: 0 when this node's run completed, 1 when it failed or the run was called\n"
            "off at the barrier (another task failed, or did not arrive in time), 2 on bad flags or\n"
            "a missing identity, 130/143 after SIGINT/SIGTERM."
        ),
    )
    p.set_defaults(func=run_task, rack=None)
    # The actions are the run parser's own objects, built for this parser alone.
    for action in p._actions:
        if action.dest == "output":
            action.help = argparse.SUPPRESS  # the task decides where its record goes
        elif action.dest in _TASK_IDENTITY_HELP:
            action.help = _TASK_IDENTITY_HELP[action.dest]
    add_task_flags(p)


def _register_collect(rack_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rackscope.cli import HelpFormatter
    from rackscope.rack.spec import DEFAULT_STRAGGLER_THRESHOLD

    p = rack_sub.add_parser(
        "collect",
        help="build the rack record from what rack tasks left in their results folder",
        formatter_class=HelpFormatter,
        description=(
            "Read what the tasks of a rack run (`rackscope rack task`) left in their shared results\n"
            "folder, check every file as untrusted input, and write the rack record (rack.json,\n"
            "rackscope.rack/1) and config.json into it: the bundle of `rackscope rack run`. A task\n"
            "that left no files is marked missing, one that failed or stopped without a final\n"
            "status failed or lost, with the reason.\n\n"
            "Exit status: 0 when every node completed, 1 when some node failed or is missing,\n"
            "2 when the folder holds no rack run."
        ),
    )
    p.add_argument("folder", metavar="RESULTS", help="the --results folder the tasks wrote into")
    p.add_argument("--straggler-threshold", type=float, default=DEFAULT_STRAGGLER_THRESHOLD,
                   help="a node below this fraction of the median node is a straggler")
    p.add_argument("--json", action="store_true", help="print the rack record to stdout (nothing else)")
    p.set_defaults(func=collect_main)


def collect_main(args: argparse.Namespace) -> int:
    from rackscope.fileio import dumps
    from rackscope.rack.collect import collect
    from rackscope.rack.record import exit_code

    record = collect(Path(args.folder), threshold=args.straggler_threshold)
    if args.json:
        sys.stdout.buffer.write(dumps(record))
        sys.stdout.flush()
    else:
        from rackscope.rack.demo_view import summary_text

        print(summary_text(record, bundle=args.folder))
    return exit_code(record)


def run_rack(args: argparse.Namespace) -> int:
    import uuid

    from rackscope.fileio import dumps
    from rackscope.rack.coordinator import RackRun
    from rackscope.rack.record import exit_code
    from rackscope.rack.spec import RackRunSpec, default_output_dir, parse_agents

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
        call_timeout_s=args.call_timeout_s,
        collect_timeout_s=args.collect_timeout_s,
        timeout_s=args.timeout_s,
        straggler_threshold=args.straggler_threshold,
    )
    record, signum = asyncio.run(_run_until_signalled(RackRun(spec)))
    if record is None:
        name = signal.Signals(signum or signal.SIGINT).name
        print(f"rackscope rack run: stopped by {name}; what was collected is in {output}", file=sys.stderr)
        return 128 + (signum or signal.SIGINT)
    if args.json:
        sys.stdout.buffer.write(dumps(record))
        sys.stdout.flush()
    else:
        from rackscope.rack.demo_view import summary_text

        print(summary_text(record, bundle=str(output)))
    return exit_code(record)


async def _run_until_signalled(coordinator: RackRun) -> tuple[dict[str, Any] | None, int | None]:
    """The rack record, or the signal that stopped the run. SIGINT and SIGTERM alike cancel the
    agents' runs and finalize the bundle; a second signal stops waiting for the agents' answers."""
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def stop(signum: int) -> None:
        received.append(signum)
        coordinator.interrupt(f"interrupted by {signal.Signals(signum).name}")

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await coordinator.run(), None
    except asyncio.CancelledError:
        if not received:
            raise
        return None, received[0]
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


def _register_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rackscope.agent.faults import FAULTS
    from rackscope.cli import HelpFormatter
    from rackscope.rack import demo
    from rackscope.simgpu import PROFILES

    p = sub.add_parser(
        "demo",
        help="run a simulated GB300 NVL72 rack here (no GPU, no Docker) with a live view",
        formatter_class=HelpFormatter,
        description=(
            "Start a simulated rack of node agents in this process (each with its own Prometheus\n"
            "endpoint and control API), run the offline Llama2-70B workload across it through the\n"
            "same path as `rackscope rack run`, show rack tokens/s against the 1,100,948 tokens/s\n"
            "GB300 NVL72 record, per-node bars, kW, tokens/J and per-GPU power, and end with the\n"
            "rack summary. Everything shown is SIMULATED.\n\n"
            "faults for --inject FAULT[=VALUE]@NODE[/GPU] (e.g. power-cap=700@n03, thermal-throttle@n05):\n"
            + "\n".join(f"  {k:17} {v}" for k, v in FAULTS.items())
        ),
    )
    p.add_argument("--nodes", type=int, default=demo.DEFAULT_NODES, help="simulated nodes")
    p.add_argument("--gpus-per-node", type=int, default=demo.DEFAULT_GPUS_PER_NODE, help="GPUs per node")
    p.add_argument("--gpu-model", choices=sorted(PROFILES), default=demo.DEFAULT_GPU_MODEL, help="simulated GPU model")
    p.add_argument("--duration", dest="duration_s", type=float, default=demo.DEFAULT_DURATION_S,
                   help="measured seconds")
    p.add_argument("--rack", default=demo.DEFAULT_RACK, help="rack name on every series")
    p.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="FAULT@NODE",
        help="inject a fault on a node before the run, e.g. power-cap=700@n03 (repeatable)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="Prometheus port of the first node, the others follow; 0 picks free ports",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the per-node variation")
    p.add_argument("--no-tui", dest="tui", action="store_false", default=True,
                   help="plain progress lines instead of the live view (the live view needs a terminal)")
    p.add_argument("--json", action="store_true", help="print the rack record to stdout, nothing else")
    p.add_argument("--output", default=None, help="write the results bundle to this folder")
    p.set_defaults(func=demo.run)
