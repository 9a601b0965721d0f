"""``rackscope demo``: a simulated rack (default GB300 NVL72, 18 nodes x 4 GPUs) on this
machine, driven through the same rack-run path as real agents, with a live terminal view.

The node agents are ``NodeAgent`` objects sharing one process and one event loop, each with
its own simulated GPUs, telemetry (its own ``/metrics`` port) and control API port. One
process, not one per node, because of memory: ``benchmarks/sim_scale.py`` measures the
18-agent rack at 266 MiB RSS in one process against 1,164 MiB for 18 agent processes (each
carries its own interpreter, FastAPI, uvicorn and OpenTelemetry, ~65 MiB), so only one
process meets the 1 GiB goal; it also costs less CPU (0.48 against 0.74 cores). The rack run
itself goes over HTTP to each agent's API exactly as ``rackscope rack run`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import math
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rackscope.errors import ConfigError
from rackscope.runner.engines.base import ReportsStats

if TYPE_CHECKING:
    from rich.console import Console

    from rackscope.agent.faults import Fault
    from rackscope.agent.node import NodeAgent
    from rackscope.rack.coordinator import RackRun
    from rackscope.rack.demo_view import RackLive

log = logging.getLogger(__name__)

DEFAULT_NODES = 18
DEFAULT_GPUS_PER_NODE = 4
DEFAULT_GPU_MODEL = "gb300"
DEFAULT_DURATION_S = 20.0
DEFAULT_RACK = "nvl72"
VIEW_REFRESH_HZ = 4.0  # the view's frame rate; sampling the in-process agents is cheap
RATE_WINDOW_S = 2.0  # live tokens/s and tokens/J are averaged over this window
DEMO_GC_THRESHOLDS = (50_000, 50, 100)
PLAIN_PROGRESS_EVERY_S = 5.0  # --no-tui: one progress line this often
SCRAPE_INTERVAL = "5s"
POLL_INTERVAL_S = 1.0  # the coordinator's status polls share the agents' process: keep them few
# Output lengths vary as in MLPerf's OpenOrca set (mean 294 tokens) rather than all alike, so
# requests do not finish in synchronized waves (which would make the live view lurch).
DEMO_LENGTH_DIST = "lognormal"
# Requests kept in flight per node, over what its GPUs batch at once: enough to keep every GPU
# saturated, few enough that stopping them at the end of a node's window is brief (all nodes
# share one event loop, and a node still measuring would lose that time).
INFLIGHT_HEADROOM = 1.05
# Load kept on (not measured) before the window opens, so every node's start-up burst (issuing
# its first requests) is over before any node measures. The runner drains an offline warm-up
# before measuring (MLPerf's single query), so the demo holds the offline load level as a
# concurrency run instead; see demo_run_config.
DEMO_WARMUP_S = 2.0


@dataclass(frozen=True)
class NodeFault:
    """``--inject FAULT[=VALUE]@NODE[/GPU]``: a fault on one node (every GPU, or one)."""

    node: str
    fault: Fault

    @staticmethod
    def parse(spec: str, nodes: list[str]) -> NodeFault:
        from rackscope.agent.faults import parse_fault

        what, sep, where = spec.rpartition("@")
        if not sep or not what or not where:
            raise ConfigError(f"bad --inject {spec!r}: expected FAULT[=VALUE]@NODE[/GPU], e.g. power-cap=700@n03")
        node_text, _, gpu_text = where.partition("/")
        node = resolve_node(node_text, nodes)
        fault = parse_fault(what + (f"@{gpu_text}" if gpu_text else ""))
        return NodeFault(node, fault)


def offline_inflight(opts: DemoOptions) -> int:
    from rackscope.runner.engines.sim import deployment_for
    from rackscope.simgpu import profile

    batch = deployment_for(profile(opts.gpu_model)).max_batch
    return math.ceil(batch * opts.gpus_per_node * INFLIGHT_HEADROOM)


def demo_run_config(opts: DemoOptions) -> dict[str, Any]:
    """The run every node gets: Llama2-70B offline, measured in steady state.

    A duration-bounded offline run keeps every GPU saturated: the engine's batch capacity
    (plus a little queue) in flight and topped up, rather than one burst of thousands of
    requests per node that would stall the event loop all nodes share. The simulated GPUs
    start in steady state (batches part-way through generation, as in the middle of a long
    MLPerf run) and a short warm-up, with the load kept on, lets every node issue its first
    requests before the window opens.
    """
    return {
        "engine": "sim",
        "scenario": "offline",
        "offline_inflight": offline_inflight(opts),
        "duration_s": opts.duration_s,
        "warmup_s": DEMO_WARMUP_S,
        "length_dist": DEMO_LENGTH_DIST,
        "sim_warm_start": True,
        "seed": opts.seed,
    }


def node_names(count: int) -> list[str]:
    width = max(2, len(str(count)))
    return [f"n{i:0{width}d}" for i in range(1, count + 1)]


def resolve_node(text: str, nodes: list[str]) -> str:
    """``n03``, ``N3`` or ``3`` -> ``n03``."""
    key = text.strip().lower()
    if key in nodes:
        return key
    digits = key[1:] if key.startswith("n") else key
    if digits.isdigit() and 1 <= int(digits) <= len(nodes):
        return nodes[int(digits) - 1]
    raise ConfigError(f"no node {text!r} in this demo: nodes are {nodes[0]}-{nodes[-1]}")


@dataclass
class DemoOptions:
    nodes: int = DEFAULT_NODES
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    gpu_model: str = DEFAULT_GPU_MODEL
    duration_s: float = DEFAULT_DURATION_S
    rack: str = DEFAULT_RACK
    inject: list[str] = field(default_factory=list)
    tui: bool = True
    json: bool = False
    output: Path | None = None
    seed: int = 0
    metrics_port: int = 0  # first node's port; the others follow. 0: any free ports
    interval_s: float = 1.0

    def validate(self) -> DemoOptions:
        from rackscope.simgpu import PROFILES

        if not 1 <= self.nodes <= 256:
            raise ConfigError(f"--nodes must be 1-256, not {self.nodes}")
        if not 1 <= self.gpus_per_node <= 16:
            raise ConfigError(f"--gpus-per-node must be 1-16, not {self.gpus_per_node}")
        if self.gpu_model.lower() not in PROFILES:
            raise ConfigError(f"--gpu-model must be one of {', '.join(PROFILES)}, not {self.gpu_model!r}")
        if not 0 < self.duration_s <= 24 * 3600:
            raise ConfigError(f"--duration must be positive (at most a day), not {self.duration_s:g}")
        if self.metrics_port and not 1024 <= self.metrics_port <= 65535 - self.nodes:
            raise ConfigError(f"--metrics-port must leave room for {self.nodes} ports below 65536")
        self.faults()  # parse errors surface before anything starts
        return self

    def faults(self) -> list[NodeFault]:
        names = node_names(self.nodes)
        return [NodeFault.parse(spec, names) for spec in self.inject]


# --- the rack of in-process agents -----------------------------------------------------------------
class DemoRack:
    """N simulated node agents in this process, each with its own metrics and API port."""

    def __init__(self, opts: DemoOptions, results_dir: Path) -> None:
        from rackscope.agent.node import NodeAgent
        from rackscope.agent.settings import AgentSettings
        from rackscope.agent.sources.sim import SimSource
        from rackscope.clock import WallClock
        from rackscope.simgpu import make_node_gpus

        self.opts = opts
        self.clock = WallClock()
        self.agents: list[NodeAgent] = []
        for i, node in enumerate(node_names(opts.nodes)):
            settings = AgentSettings(
                source="sim",
                gpu_model=opts.gpu_model.lower(),
                gpus=opts.gpus_per_node,
                rack=opts.rack,
                node=node,
                interval_s=opts.interval_s,
                metrics_port=opts.metrics_port + i if opts.metrics_port else 0,
                api_port=0,
                seed=opts.seed,
            ).validate()
            gpus = make_node_gpus(settings.gpu_model, settings.gpus, self.clock, opts.rack, node, opts.seed)
            source = SimSource(gpus)
            agent = NodeAgent(settings, source, source.open(), sim_gpus=gpus, clock=self.clock)
            agent.runs.results_dir = str(results_dir / node)
            self.agents.append(agent)
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        readies = []
        for agent in self.agents:
            ready = asyncio.Event()
            readies.append(ready)
            self._tasks.append(asyncio.create_task(agent.serve(self.stop, ready), name=f"agent-{agent.identity.node}"))
        waiting = [asyncio.create_task(r.wait()) for r in readies]
        try:
            while not all(r.is_set() for r in readies):
                failed = [t for t in self._tasks if t.done()]
                if failed:
                    failed[0].result()  # raises what stopped it (a bind error)
                    raise OSError(f"agent {failed[0].get_name()} stopped during start-up")
                await asyncio.wait(waiting, timeout=0.05)
        finally:
            for w in waiting:
                w.cancel()

    async def close(self) -> None:
        self.stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def api_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{a.api_port}" for a in self.agents]

    def metrics_targets(self) -> list[str]:
        return [f"127.0.0.1:{a.telemetry.metrics_port}" for a in self.agents]


def scrape_config(targets: list[str], job: str = "rackscope-demo") -> str:
    """A Prometheus scrape config for the demo's endpoints (identity labels are already on
    every series, so no relabelling is needed)."""
    lines = [
        "scrape_configs:",
        f"  - job_name: {job}",
        f"    scrape_interval: {SCRAPE_INTERVAL}",
        "    static_configs:",
        "      - targets:",
        *(f"          - '{t}'" for t in targets),
    ]
    return "\n".join(lines) + "\n"


# --- live state for the view ----------------------------------------------------------------------
class LiveSampler:
    """Reads the in-process agents directly (engine token counters, simulated GPU power and
    energy): a few microseconds per node, no HTTP, no metric parsing."""

    def __init__(self, rack: DemoRack, run_id: str) -> None:
        self.rack = rack
        self.run_id = run_id
        self.history: dict[str, deque[tuple[float, float]]] = {}
        self.energy: deque[tuple[float, float, float]] = deque()  # (t, rack tokens, rack joules)

    def _tokens(self, agent: NodeAgent) -> float:
        state = agent.runs.runs.get(self.run_id)
        engine = state.engine if state is not None else None
        return float(engine.stats().output_tokens) if isinstance(engine, ReportsStats) else 0.0

    def sample(self, coordinator: RackRun | None, phase: str, elapsed_s: float) -> RackLive:
        from rackscope.rack.demo_view import NodeLive, RackLive

        now = time.monotonic()
        statuses = {n.agent: n.status for n in coordinator.nodes} if coordinator is not None else {}
        nodes = []
        total_tokens = total_energy = 0.0
        for agent, url in zip(self.rack.agents, self.rack.api_urls(), strict=True):
            node = agent.identity.node
            tokens = self._tokens(agent)
            total_tokens += tokens
            hist = self.history.setdefault(node, deque())
            hist.append((now, tokens))
            while len(hist) > 2 and now - hist[1][0] >= RATE_WINDOW_S:
                hist.popleft()
            t0, k0 = hist[0]
            rate = (tokens - k0) / (now - t0) if now > t0 else 0.0
            gpus = agent.sim_gpus or []
            powers: list[float | None] = []
            for gpu in gpus:
                gpu.advance()
                total_energy += gpu.energy_j
                powers.append(None if gpu.faults.dropped else gpu.power_w())
            nodes.append(
                NodeLive(
                    node=node,
                    status=statuses.get(url, "waiting"),
                    tokens_per_s=max(0.0, rate),
                    power_w=math.fsum(p for p in powers if p is not None),
                    gpu_power_w=powers,
                    gpu_limit_w=gpus[0].profile.power_limit_w if gpus else 1.0,
                    faults=[f.name + (f"@{f.gpu}" if f.gpu is not None else "") for f in agent.faults],
                )
            )
        self.energy.append((now, total_tokens, total_energy))
        while len(self.energy) > 2 and now - self.energy[1][0] >= RATE_WINDOW_S:
            self.energy.popleft()
        _, k0, e0 = self.energy[0]
        tokens_per_j = (total_tokens - k0) / (total_energy - e0) if total_energy > e0 and total_tokens > k0 else None
        from rackscope.simgpu import profile

        prof = profile(self.rack.opts.gpu_model)
        opts = self.rack.opts
        return RackLive(
            rack=opts.rack,
            gpu_model=f"{opts.gpus_per_node} x {prof.name}",
            nodes=nodes,
            elapsed_s=elapsed_s,
            duration_s=opts.duration_s,
            warmup_s=DEMO_WARMUP_S,
            phase=phase,
            tokens_per_j=tokens_per_j,
            expected_tokens_per_s=opts.nodes * opts.gpus_per_node * prof.llama2_70b_tokens_per_s,
        )


# --- log lines while the view is up --------------------------------------------------------------
class ConsoleLogHandler(logging.Handler):
    """Prints log records through the live view's console: rich writes them above the view and
    redraws the view below, where a write to the terminal behind its back would leave the frame
    it had drawn on screen and the next refresh would draw a second one under the log line."""

    def __init__(self, console: Console) -> None:
        from rackscope.logs import formatter

        super().__init__()
        self.console = console
        # The escaping formatter, as on stderr: a newline in a message cannot forge a line, nor an
        # escape sequence move the cursor under the view.
        self.setFormatter(formatter())

    def emit(self, record: logging.LogRecord) -> None:
        from rich.text import Text

        try:
            line = self.format(record)
            # Text, not a string: a message's square brackets are not rich markup.
            self.console.print(Text(line), highlight=False)
        except Exception:  # noqa: BLE001 - as logging's own handlers: a failed log line must not end the run
            self.handleError(record)


@contextlib.contextmanager
def logs_through(console: Console) -> Iterator[None]:
    """Sends every log record through ``console`` while the block runs, then puts the root
    logger's own handlers back."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [ConsoleLogHandler(console)]
    try:
        yield
    finally:
        root.handlers = saved


# Every node's engine logs the same line as it starts; the demo starts all of them at once.
ENGINE_LOGGER = "rackscope.runner.engines.sim"
ENGINE_START_PREFIX = "simulated engine %s on "  # the start-up line's format, before its arguments


class SameLineOncePerRack(logging.Filter):
    """Holds back the engines' start-up lines until every node has logged its own, then logs each
    distinct line once with the number of nodes that logged it: eighteen alike become one, and a
    node whose engine differs (another GPU count, say) still gets a line of its own."""

    def __init__(self, logger: logging.Logger, nodes: int, prefix: str = ENGINE_START_PREFIX) -> None:
        super().__init__()
        self.logger = logger
        self.nodes = nodes
        self.prefix = prefix
        self.held: dict[str, int] = {}  # line -> nodes that logged it (insertion order kept)
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "rackscope_grouped", False) or not str(record.msg).startswith(self.prefix):
            return True
        text = record.getMessage()
        self.held[text] = self.held.get(text, 0) + 1
        self.seen += 1
        if self.seen >= self.nodes:
            self.flush()
        return False

    def flush(self) -> None:
        """Log what is held (at the end of the run too: a node that failed before its engine
        started leaves the count short)."""
        held, self.held = self.held, {}
        for text, count in held.items():
            self.logger.info(
                "%s, on %d node%s", text, count, "" if count == 1 else "s", extra={"rackscope_grouped": True}
            )


@contextlib.contextmanager
def engine_lines_grouped(nodes: int) -> Iterator[None]:
    logger = logging.getLogger(ENGINE_LOGGER)
    grouping = SameLineOncePerRack(logger, nodes)
    logger.addFilter(grouping)
    try:
        yield
    finally:
        logger.removeFilter(grouping)
        grouping.flush()


# --- the demo ------------------------------------------------------------------------------------
async def run_demo(
    opts: DemoOptions,
    *,
    out: IO[str] | None = None,
    info: IO[str] | None = None,
    on_frame: Callable[[RackLive], None] | None = None,
) -> dict[str, Any]:
    """Start the rack, inject faults, run the offline workload across it, return the rack
    record. ``info`` gets endpoints and progress; ``out`` the view (when a TUI is wanted)."""
    from rackscope.rack.coordinator import RackRun
    from rackscope.rack.spec import RackRunSpec

    opts.validate()
    out = out or sys.stdout
    info = info or sys.stderr
    faults = opts.faults()
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rackscope-demo-")))
        stack.enter_context(engine_lines_grouped(opts.nodes))
        bundle_dir = opts.output if opts.output is not None else scratch / "bundle"
        rack = DemoRack(opts, scratch / "agents")
        await rack.start()
        try:
            targets = rack.metrics_targets()
            print(
                f"SIMULATED rack {opts.rack}: {opts.nodes} nodes x {opts.gpus_per_node} {opts.gpu_model.upper()} "
                f"(no GPU is used)",
                file=info,
            )
            print("Prometheus endpoints: " + " ".join(f"http://{t}/metrics" for t in targets), file=info)
            print("Prometheus scrape config:\n" + scrape_config(targets), file=info, flush=True)
            if opts.output is not None:
                from rackscope.rack.bundle import Bundle

                Bundle(bundle_dir).write_bytes("prometheus.yml", scrape_config(targets).encode())
            for nf in faults:
                agent = rack.agents[node_names(opts.nodes).index(nf.node)]
                agent.inject(nf.fault)
            body = demo_run_config(opts)
            spec = RackRunSpec(
                agents=rack.api_urls(), run=body, output_dir=bundle_dir, poll_interval_s=POLL_INTERVAL_S
            )
            coordinator = RackRun(spec)
            sampler = LiveSampler(rack, spec.rack_run_id)
            task = asyncio.create_task(coordinator.run(), name="rack-run")
            try:
                await _watch(task, coordinator, sampler, opts, out, info, on_frame)
                record = await task
            except asyncio.CancelledError:
                # Ctrl-C: let the coordinator cancel the runs and finalize the bundle.
                coordinator.interrupt("interrupted by SIGINT")
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise
        finally:
            await rack.close()
        return record


def _phase(coordinator: RackRun, now: float) -> tuple[str, float]:
    """What the rack is doing, and the seconds since the common start."""
    start = coordinator.start_at
    if start is None or now < start:
        return "starting", 0.0
    elapsed = now - start
    if any(n.status in ("pending", "running") for n in coordinator.nodes):
        return ("warming up" if elapsed < DEMO_WARMUP_S else "measuring"), elapsed
    return "collecting", elapsed


async def _watch(
    task: asyncio.Task[Any],
    coordinator: RackRun,
    sampler: LiveSampler,
    opts: DemoOptions,
    out: IO[str],
    info: IO[str],
    on_frame: Callable[[RackLive], None] | None,
) -> None:
    """Refresh the view (or print progress lines) until the rack run ends."""
    period = 1.0 / VIEW_REFRESH_HZ
    live = None
    if opts.tui and not opts.json:
        from rich.console import Console
        from rich.live import Live

        from rackscope.rack.demo_view import render

        console = Console(file=out)
        live = Live(console=console, auto_refresh=False, transient=False, redirect_stderr=False, redirect_stdout=False)
        live.start()
    last_line = -math.inf
    measured: RackLive | None = None  # the last frame inside the measured window
    try:
        with logs_through(live.console) if live is not None else contextlib.nullcontext():
            while not task.done():
                phase, elapsed = _phase(coordinator, time.time())
                state = sampler.sample(coordinator, phase, elapsed)
                if phase == "measuring":
                    measured = state
                if on_frame is not None:
                    on_frame(state)
                if live is not None:
                    live.update(render(state), refresh=True)
                elif time.monotonic() - last_line >= PLAIN_PROGRESS_EVERY_S and phase != "starting":
                    last_line = time.monotonic()
                    print(
                        f"[SIMULATED] {phase} {elapsed:5.1f} s: rack {state.tokens_per_s:,.0f} tokens/s, "
                        f"{state.power_w / 1000:,.1f} kW",
                        file=info,
                        flush=True,
                    )
                await asyncio.wait({task}, timeout=period)
            if live is not None and not task.cancelled() and task.exception() is None:
                # The last frame shows what was measured, not the engines winding down.
                from rackscope.rack.demo_view import final_state

                last = measured or sampler.sample(coordinator, "done", 0.0)
                live.update(render(final_state(last, task.result())), refresh=True)
    finally:
        if live is not None:
            live.stop()


# --- the command (its flags are in rack/cli.py) ----------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from rackscope.fileio import dumps
    from rackscope.rack.record import exit_code

    opts = DemoOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_model=args.gpu_model,
        duration_s=args.duration_s,
        rack=args.rack,
        inject=list(args.inject),
        tui=args.tui and sys.stdout.isatty(),
        json=args.json,
        output=Path(args.output) if args.output else None,
        seed=args.seed,
        metrics_port=args.metrics_port,
    ).validate()
    # Hundreds of thousands of simulated requests live at once: freeze what start-up built and
    # let the young generation grow, or the collector rescans them many times a second
    # (measured with benchmarks/sim_scale.py: about 0.05 of a core).
    gc.freeze()
    gc.set_threshold(*DEMO_GC_THRESHOLDS)
    record = asyncio.run(run_demo(opts, info=sys.stderr if opts.json else sys.stdout))
    if opts.json:
        sys.stdout.buffer.write(dumps(record))
        sys.stdout.flush()
    else:
        from rackscope.rack.demo_view import summary_text

        print(summary_text(record, bundle=str(opts.output) if opts.output else None))
    return exit_code(record)
