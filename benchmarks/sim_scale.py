"""Cost of simulating a whole rack in real time, both ways: N node agents as N processes,
or as N identities (``NodeAgent`` objects, each with its own metrics and API port) in one
process, the way ``rackscope demo`` runs them.

Every configuration runs the offline workload continuously on simulated GPUs while this
script scrapes each agent's /metrics endpoint (as Prometheus would) and measures, from
outside the processes, over the same window:
- CPU: user + system time per wall second (/proc/PID/stat), in cores;
- memory: RSS and PSS (/proc/PID/smaps_rollup; PSS splits shared pages among the processes
  that share them, so a sum of PSS is the honest total for many processes);
- real time: output tokens/s read from the agents' own counters, against the GPU profile.

Figures are printed as ratios against baselines measured in the same run (an idle Python
process with the agent's imports for memory, one agent process for CPU), because this machine
is shared and absolute timings are noisy.

``--baseline-tree DIR`` measures the one-process rack of another revision of the code beside
this one (DIR: a copy of the repository at that revision, ``git archive REV | tar -x -C DIR``):
its rack runs from DIR's modules under this script's harness, alternating with the current
one for ``--rounds`` rounds, and the table adds both and their ratio, also as CPU time per
output token (a change that costs CPU but also moves more tokens is judged per token).
``--configs`` picks which configurations to run.

    .venv/bin/python benchmarks/sim_scale.py                # 18 nodes x 4 GB300, 20 s windows
    .venv/bin/python benchmarks/sim_scale.py --seconds 10 --json
    .venv/bin/python benchmarks/sim_scale.py --configs rack --baseline-tree ../old --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30
MIB = 1 << 20
CPU_GOAL_CORES = 0.25
MEMORY_GOAL_BYTES = GIB
START_TIMEOUT_S = 120.0
# What an agent process imports before it does anything: the idle baseline imports the same.
AGENT_IMPORTS = (
    "rackscope.agent.node", "rackscope.agent.api", "rackscope.agent.runs", "rackscope.agent.sources.sim",
    "rackscope.agent.telemetry",
    "rackscope.runner.runloop", "rackscope.runner.engines.sim", "fastapi", "uvicorn",
)
TOKENS_REPORT_S = 0.5  # the one-process rack reports its engines' token counters this often


# --- /proc ------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def memory_bytes(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return rss, pss


# --- processes ----------------------------------------------------------------------------------------
class Child:
    """A child process whose stderr is drained by a thread and searched for a line. ``tree``:
    the copy of the repository its ``rackscope`` modules come from (this one by default)."""

    def __init__(self, cmd: list[str], ready_prefix: str | None, tree: Path = REPO) -> None:
        # PYTHONPATH first: a script's own folder, not the working directory, starts sys.path,
        # and the editable install would otherwise resolve rackscope to this checkout.
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.ready_prefix = ready_prefix
        self.ready = threading.Event()
        self.ready_line = ""
        self.tokens: float | None = None  # the latest "tokens=N" report (one-process rack)
        self.tail: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith("tokens="):
                self.tokens = float(line[7:])
                continue
            self.tail = [*self.tail[-40:], line]
            if self.ready_prefix is None or line.startswith(self.ready_prefix):
                self.ready_line = line.strip()
                self.ready.set()

    def wait_ready(self, deadline: float) -> None:
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("child did not start:\n" + "".join(self.tail))

    def metrics_ports(self) -> list[int]:
        ports = re.findall(r"metrics_ports?=([0-9,]+)", self.ready_line)
        return [int(p) for p in ports[0].split(",")] if ports else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def agent_cmd(node: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "rackscope", "--log-level", "warning", "agent", "--source", "sim",
            "--gpu-model", args.gpu_model, "--gpus", str(args.gpus_per_node), "--rack", "bench", "--node", node,
            "--metrics-port", "0", "--api-port", "0", "--workload", "offline"]


# --- measuring a configuration -----------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    processes: int
    nodes: int
    gpus: int
    wall_s: float = 0.0
    cpu_cores: float = 0.0
    rss_bytes: int = 0
    pss_bytes: int = 0
    tokens_per_s: float | None = None
    expected_tokens_per_s: float | None = None
    notes: list[str] = field(default_factory=list)


def scrape(ports: list[int]) -> None:
    """One Prometheus-style scrape of every endpoint (its cost lands on the agents)."""
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            resp.read()


def reported_tokens(children: list[Child]) -> float | None:
    values = [c.tokens for c in children]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def measure(name: str, children: list[Child], nodes: int, args: argparse.Namespace) -> Result:
    from rackscope.simgpu import profile

    deadline = time.monotonic() + START_TIMEOUT_S
    for c in children:
        c.wait_ready(deadline)
    ports = [p for c in children for p in c.metrics_ports()]
    time.sleep(args.settle)  # start-up done, the offline ramp under way
    pids = [c.proc.pid for c in children]
    tokens0 = reported_tokens(children)
    cpu0, t0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
    next_scrape = t0 + args.scrape_interval
    while time.monotonic() < t0 + args.seconds:
        time.sleep(max(0.0, min(next_scrape, t0 + args.seconds) - time.monotonic()))
        if ports and time.monotonic() >= next_scrape:
            scrape(ports)
            next_scrape += args.scrape_interval
    cpu1, t1 = sum(cpu_seconds(p) for p in pids), time.monotonic()
    tokens1 = reported_tokens(children)
    mem = [memory_bytes(p) for p in pids]
    r = Result(name, len(children), nodes, nodes * args.gpus_per_node)
    r.wall_s = t1 - t0
    r.cpu_cores = (cpu1 - cpu0) / r.wall_s
    r.rss_bytes = sum(m[0] for m in mem)
    r.pss_bytes = sum(m[1] for m in mem)
    if tokens0 is not None and tokens1 is not None and nodes:
        r.tokens_per_s = (tokens1 - tokens0) / r.wall_s
        r.expected_tokens_per_s = r.gpus * profile(args.gpu_model).llama2_70b_tokens_per_s
    return r


def run_config(
    name: str, cmds: list[list[str]], prefix: str | None, nodes: int, args: argparse.Namespace, tree: Path = REPO
) -> Result:
    children = [Child(cmd, prefix, tree) for cmd in cmds]
    try:
        return measure(name, children, nodes, args)
    finally:
        for c in children:
            c.stop()


# --- the one-process rack (child mode) --------------------------------------------------------------------
async def rack_child(args: argparse.Namespace) -> None:
    """N agents in this process, as the demo runs them, each with the continuous offline
    workload; prints one ready line with the metrics ports, runs until SIGTERM."""
    import gc

    from rackscope.rack.demo import DEMO_GC_THRESHOLDS, DemoOptions, DemoRack
    from rackscope.runner.engines.base import ReportsStats

    gc.freeze()  # as `rackscope demo` does
    gc.set_threshold(*DEMO_GC_THRESHOLDS)
    opts = DemoOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_model=args.gpu_model, tui=False)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rackscope-bench-") as scratch:
        rack = DemoRack(opts.validate(), Path(scratch))
        await rack.start()
        for agent in rack.agents:
            agent.runs.start_continuous("offline")
        ports = ",".join(str(a.telemetry.metrics_port) for a in rack.agents)
        print(f"rack ready metrics_ports={ports}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        while not stop.is_set():
            # The engines' own counters: did the simulation keep up with the wall clock?
            tokens = 0
            for agent in rack.agents:
                engine = agent.runs.active.engine if agent.runs.active is not None else None
                tokens += engine.stats().output_tokens if isinstance(engine, ReportsStats) else 0
            print(f"tokens={tokens}", file=sys.stderr, flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TOKENS_REPORT_S)
        await rack.close()


def idle_child() -> None:
    import importlib

    for name in AGENT_IMPORTS:
        importlib.import_module(name)
    print("idle ready", file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGTERM})


# --- report ---------------------------------------------------------------------------------------------------
def us_per_token(r: Result) -> float | None:
    """CPU microseconds per output token the rack generated (None without a token count)."""
    return r.cpu_cores / r.tokens_per_s * 1e6 if r.tokens_per_s else None


def mean_result(name: str, runs: list[Result]) -> Result:
    """The rounds of one configuration as one row: CPU and tokens/s averaged over the rounds."""
    first = runs[0]
    r = Result(name, first.processes, first.nodes, first.gpus)
    r.wall_s = sum(x.wall_s for x in runs)
    r.cpu_cores = sum(x.cpu_cores * x.wall_s for x in runs) / r.wall_s
    r.rss_bytes = max(x.rss_bytes for x in runs)
    r.pss_bytes = max(x.pss_bytes for x in runs)
    rates = [x.tokens_per_s for x in runs]
    if all(rate is not None for rate in rates):
        r.tokens_per_s = sum((x.tokens_per_s or 0.0) * x.wall_s for x in runs) / r.wall_s
    r.expected_tokens_per_s = first.expected_tokens_per_s
    r.notes = [f"{len(runs)} rounds: " + ", ".join(f"{x.cpu_cores:.3f}" for x in runs) + " cores"]
    return r


def report(results: list[Result], args: argparse.Namespace) -> str:
    by = {r.name: r for r in results}
    idle = by.get("idle python (agent imports)")
    one = by.get("1 agent process")
    procs = by.get(f"{args.nodes} agent processes")
    ident = by.get(f"1 process, {args.nodes} identities")
    base = by.get(f"baseline: 1 process, {args.nodes} identities")
    lines = [
        f"sim_scale: {args.nodes} nodes x {args.gpus_per_node} {args.gpu_model.upper()}, offline workload, "
        f"{args.seconds:g} s windows, /metrics scraped every {args.scrape_interval:g} s, {os.cpu_count()} CPUs",
        "",
        f"{'configuration':<40} {'procs':>5} {'CPU cores':>9} {'x 1 agent':>9} {'RSS MiB':>8} {'PSS MiB':>8} "
        f"{'PSS x idle':>10} {'real time':>9} {'CPU us/token':>12}",
    ]
    for r in results:
        rt = "-"
        if r.tokens_per_s and r.expected_tokens_per_s:
            rt = f"{r.tokens_per_s / r.expected_tokens_per_s:.1%}"
        per_agent = f"{r.cpu_cores / one.cpu_cores:>9.2f}" if one else f"{'-':>9}"
        per_idle = f"{r.pss_bytes / idle.pss_bytes:>10.2f}" if idle else f"{'-':>10}"
        cost = us_per_token(r)
        lines.append(
            f"{r.name:<40} {r.processes:>5} {r.cpu_cores:>9.3f} {per_agent} "
            f"{r.rss_bytes / MIB:>8.0f} {r.pss_bytes / MIB:>8.0f} {per_idle} {rt:>9} "
            f"{f'{cost:.3f}' if cost is not None else '-':>12}"
        )
        lines += [f"    {note}" for note in r.notes]
    lines += [
        "real time: the engines' output tokens/s over the window against the GPU profile (reported by the",
        "one-process rack; offline throughput swings as request waves finish, so use windows of 20 s or more)",
        "",
    ]
    if ident and procs:
        lines.append(
            f"one process vs {args.nodes} processes: CPU x {ident.cpu_cores / procs.cpu_cores:.2f}, "
            f"PSS x {ident.pss_bytes / procs.pss_bytes:.2f}, RSS x {ident.rss_bytes / procs.rss_bytes:.2f}"
        )
    if ident and one and procs:
        extra = (ident.pss_bytes - one.pss_bytes) / max(1, args.nodes - 1)
        lines.append(
            f"per extra identity in one process: {extra / MIB:.1f} MiB PSS; "
            f"per agent process: {procs.pss_bytes / args.nodes / MIB:.1f} MiB PSS"
        )
    if ident and base:
        ratio = ident.cpu_cores / base.cpu_cores
        cost, base_cost = us_per_token(ident), us_per_token(base)
        per_token = f", CPU per token x {cost / base_cost:.3f}" if cost and base_cost else ""
        lines.append(f"current vs baseline tree (one process): CPU x {ratio:.3f}{per_token}")
    for label, r in (("one process", ident), (f"{args.nodes} processes", procs), ("baseline tree", base)):
        if r is not None:
            lines.append(f"goal CPU < {CPU_GOAL_CORES} core, {label}: {r.cpu_cores:.3f} "
                         f"({'met' if r.cpu_cores < CPU_GOAL_CORES else 'MISSED'})")
    for label, r in (("one process", ident), (f"{args.nodes} processes", procs)):
        if r is not None:
            lines.append(f"goal RSS < 1 GiB, {label}: {r.rss_bytes / GIB:.2f} GiB "
                         f"({'met' if r.rss_bytes < MEMORY_GOAL_BYTES else 'MISSED'}; PSS {r.pss_bytes / GIB:.2f} GiB)")
    return "\n".join(lines)


CONFIGS = ("idle", "one", "procs", "rack")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=18)
    p.add_argument("--gpus-per-node", type=int, default=4)
    p.add_argument("--gpu-model", default="gb300")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window per configuration")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after start-up before measuring")
    p.add_argument("--scrape-interval", type=float, default=5.0, help="seconds between /metrics scrapes")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, of {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--baseline-tree", type=Path, help="a copy of another revision: its one-process rack too")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the one-process rack (alternating with "
                   "the baseline tree's)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON after the table")
    p.add_argument("--child", choices=("rack", "idle"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "rack":
        asyncio.run(rack_child(args))
        return 0
    if args.child == "idle":
        idle_child()
        return 0
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    me = [sys.executable, str(Path(__file__).resolve()), "--nodes", str(args.nodes), "--gpus-per-node",
          str(args.gpus_per_node), "--gpu-model", args.gpu_model]
    rack_name = f"1 process, {args.nodes} identities"
    results = []
    if "idle" in configs:
        results.append(run_config("idle python (agent imports)", [[*me, "--child", "idle"]], "idle ready", 0, args))
    if "one" in configs:
        results.append(run_config("1 agent process", [agent_cmd("n01", args)], "rackscope agent ready", 1, args))
    if "procs" in configs:
        results.append(run_config(
            f"{args.nodes} agent processes", [agent_cmd(f"n{i:02d}", args) for i in range(1, args.nodes + 1)],
            "rackscope agent ready", args.nodes, args))
    if "rack" in configs:
        baseline_tree = args.baseline_tree.resolve() if args.baseline_tree else None
        current: list[Result] = []
        baseline: list[Result] = []
        for _ in range(max(1, args.rounds)):
            if baseline_tree is not None:
                baseline.append(run_config(f"baseline: {rack_name}", [[*me, "--child", "rack"]], "rack ready",
                                           args.nodes, args, tree=baseline_tree))
            current.append(run_config(rack_name, [[*me, "--child", "rack"]], "rack ready", args.nodes, args))
        if baseline:
            results.append(mean_result(f"baseline: {rack_name}", baseline) if len(baseline) > 1 else baseline[0])
        results.append(mean_result(rack_name, current) if len(current) > 1 else current[0])
    print(report(results, args))
    if args.json:
        print(orjson.dumps([asdict(r) for r in results], option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
