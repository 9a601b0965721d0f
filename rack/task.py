"""``rackscope rack task``: one node's part of a rack run that a scheduler started.

Under Slurm (``srun rackscope rack task ...``) or a Kubernetes Indexed Job every task runs this
on its own node. It finds out who it is (rack/identity.py), claims its node's folder in the
shared results folder, starts its engine, waits at the start barrier with the other tasks
(rack/barrier.py), runs the ``rackscope run`` workload (runner/driver.py, with the same flags
and checks) and leaves its files where ``rackscope rack collect`` finds them, in the layout of
a rack run's bundle (rack/bundle.py)::

    RESULTS/barrier/RANK.json                 each task's arrival at the start barrier
    RESULTS/barrier/start.json                the start decision: go at start_at, or off and why
    RESULTS/nodes/NODE/node.json              the task's identity (rank, node, rack, scheduler)
    RESULTS/nodes/NODE/run.json               its view of the run: status, error, times, summary
    RESULTS/nodes/NODE/RUN_ID.json            the run record (rackscope.run/1)
    RESULTS/nodes/NODE/RUN_ID.requests.jsonl  its per-request rows

Every file is written atomically; ``run.json`` turns final last, after the record. A task that
cannot start (bad flags on this node, an engine that does not come up, a signal) says so at
the barrier, so the others end at once instead of at the timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field

from rackscope import __version__
from rackscope.errors import ConfigError, RackscopeError, ResultError
from rackscope.fileio import write_json
from rackscope.jsontypes import JsonDict
from rackscope.rack.answers import Count, Label
from rackscope.rack.barrier import Barrier, BarrierOff, Identifier, Rank, Tasks
from rackscope.rack.bundle import NODES_DIR
from rackscope.rack.client import printable
from rackscope.rack.identity import Scheduler, TaskIdentity, resolve_identity

if TYPE_CHECKING:
    from rackscope.runner.config import RunConfig
    from rackscope.runner.driver import RunOptions

log = logging.getLogger(__name__)

NODE_FILE = "node.json"
RUN_FILE = "run.json"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TaskNode(BaseModel):
    """``nodes/NODE/node.json``: who the task is, and what it runs on."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    node: Identifier
    rack: Identifier
    rank: Rank
    tasks: Tasks
    run_id: Identifier
    host: Label
    scheduler: Scheduler
    scheduler_env: Annotated[dict[str, Label], Field(max_length=32)]
    engine: Label
    simulated: bool
    source: Label | None  # where power and energy come from: sim, or none measured
    gpu_model: Label | None
    gpus: Count | None
    version: Label


def record_name(run_id: str) -> str:
    """The run record's file name in the node's folder (as a rack run's bundle names it)."""
    return f"{run_id}.json"


# Settings a rack run shares that may differ from node to node in a scheduled run: each task
# loads its own node's inference server, at that node's address.
PER_NODE_SETTINGS = ("url",)


def rack_settings_of(config: RunConfig) -> JsonDict:
    """The settings every task of a rack run must share (those ``rackscope rack run`` sends to
    every agent, less ``PER_NODE_SETTINGS``), as the record shows them."""
    from rackscope.runner.config import rack_settings

    public = config.to_dict()
    return {name: public[name] for name in rack_settings() if name not in PER_NODE_SETTINGS}


class TaskRun:
    """One task's files and run; see the module's description."""

    def __init__(self, root: Path, me: TaskIdentity, barrier: Barrier) -> None:
        self.root = root
        self.me = me
        self.barrier = barrier
        self.folder = root / NODES_DIR / me.node
        self.claimed = False
        self.created_at = time.time()
        self.start_at: float | None = None
        self.started_at: float | None = None
        self.config: JsonDict = {}
        self.config_shared: JsonDict = {}  # what every task must agree on (rack_settings_of)
        self._running_write: threading.Thread | None = None
        self._stopped_by: int | None = None

    @property
    def record_path(self) -> Path:
        return self.folder / record_name(self.me.run_id)

    # --- files -------------------------------------------------------------------------------
    def claim(self, config: RunConfig) -> None:
        """Create the node's folder, which no other task may have: a second task with this
        node name, or a folder that holds an earlier run, is refused here, before anything runs."""
        from rackscope.runner.engines.registry import engine_spec

        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self.folder.mkdir()
        except FileExistsError:
            raise ConfigError(
                f"{self.folder} exists: another task is node {self.me.node} (several tasks per node: "
                "--node-from name-rank), or the folder holds an earlier run (give each run its own --results)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot create {self.folder}: {exc.strerror or exc}") from exc
        self.claimed = True
        self.config = config.to_dict()
        simulated = engine_spec(config.engine).simulated
        node = TaskNode(
            node=self.me.node, rack=self.me.rack, rank=self.me.rank, tasks=self.me.tasks, run_id=self.me.run_id,
            host=printable(self.me.host, 200), scheduler=self.me.scheduler,
            scheduler_env=self.me.scheduler_env, engine=config.engine, simulated=simulated,
            source="sim" if simulated else None, gpu_model=config.gpu_model, gpus=config.gpus, version=__version__,
        )
        write_json(self.folder / NODE_FILE, {**node.model_dump(), "sources": self.me.sources})
        self._write_view("pending")

    def _write_view(self, status: str, *, error: str | None = None, summary: JsonDict | None = None,
                    ended_at: float | None = None) -> None:
        """``run.json``, in the shape of the agent's run view (rack/answers.py ``RunView``)."""
        record = record_name(self.me.run_id) if status in ("completed", "failed", "cancelled") and \
            self.record_path.exists() else None
        write_json(self.folder / RUN_FILE, {
            "run_id": self.me.run_id,
            "status": status,
            "continuous": False,
            "start_at": self.start_at,
            "config": self.config,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": ended_at,
            "summary": summary,
            "record_path": record,
            "error": error,
        })

    def finish(self, status: str, error: str | None = None) -> None:
        """The final ``run.json``, written after the record (which it summarizes). Never raises:
        it runs on the way out of errors it must not hide."""
        if not self.claimed:
            return
        try:
            self._finish(status, error)
        except RackscopeError as exc:
            log.error("%s: could not write %s: %s", self.me.describe(), self.folder / RUN_FILE, exc)

    def _finish(self, status: str, error: str | None) -> None:
        if self._running_write is not None:
            self._running_write.join()
        summary = None
        if self.record_path.exists():
            from rackscope.runner.results.io import load_run

            try:
                record = load_run(self.record_path, check_rows=False)
            except ResultError as exc:
                status, error = "failed", f"its record is unreadable: {exc}"
            else:
                summary = record["summary"]
                if status == "failed" and error is None:
                    error = f"run incomplete: {summary.get('stop_reason') or record.get('error') or 'unknown reason'}"
        elif status != "cancelled" or error is None:
            status, error = "failed", error or "the run ended without a record (the task's log says why)"
        self._write_view(status, error=None if error is None else printable(error, 2000), summary=summary,
                         ended_at=time.time())

    # --- the run -----------------------------------------------------------------------------
    async def ready(self) -> None:
        """The engine has started: arrive at the barrier, wait for the common start. A signal
        meanwhile calls the whole run off (it would otherwise start without this node)."""
        loop = asyncio.get_running_loop()
        received: list[int] = []
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, received.append, signum)
        try:
            self.barrier.arrive(self.config_shared)
            decision = await self.barrier.wait(lambda: signal.Signals(received[0]).name if received else None)
        except BarrierOff:
            if received:
                self._stopped_by = received[0]
            raise
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)
        self.started_at = time.time()
        self.start_at = decision.start_at
        # Written beside the run, not before it: a slow shared file system must not delay the start.
        self._running_write = threading.Thread(target=self._write_running, daemon=True)
        self._running_write.start()

    def _write_running(self) -> None:
        try:
            self._write_view("running")
        except RackscopeError as exc:  # the final view follows; the run goes on without this one
            log.warning("%s: could not write %s: %s", self.me.describe(), self.folder / RUN_FILE, exc)

    def execute(self, config: RunConfig, options: RunOptions) -> int:
        """Run the workload between the barrier and the record; the exit status."""
        from rackscope.runner.engines.registry import engine_spec
        from rackscope.runner.finish import EXIT_SIGINT, EXIT_SIGTERM

        self.config_shared = rack_settings_of(config)
        try:
            if engine_spec(config.engine).streaming:
                from rackscope.runner.driver import drive

                code = asyncio.run(drive(config, options, ready=self.ready))
            else:
                from rackscope.runner.bench_run import run_bench

                asyncio.run(self.ready())
                code = run_bench(config, options)
        except BarrierOff as exc:
            if self._stopped_by is not None:
                self.finish("cancelled", str(exc))
                return 128 + self._stopped_by
            self.finish("failed", str(exc))
            raise
        status = {0: "completed", EXIT_SIGINT: "cancelled", EXIT_SIGTERM: "cancelled"}.get(code, "failed")
        self.finish(status, "stopped by a signal" if status == "cancelled" else None)
        return code


def run_task(args: argparse.Namespace) -> int:
    """``rackscope rack task``: exit 0 when this node's run completed, 1 when it failed or the
    run was called off, 2 on bad flags (or an identity that cannot be found), 128+N after signal N."""
    from rackscope.runner.cli import config_from_args, run_options

    if args.output is not None:
        raise ConfigError("--output does not apply: a rack task writes its record into --results RESULTS/nodes/NODE/")
    if not 0 < args.barrier_timeout_s <= 7 * 86_400:
        raise ConfigError("--barrier-timeout must be positive and at most a week")
    if not 0 <= args.start_lead_s <= 3600:
        raise ConfigError("--start-lead must be between 0 and 3600 seconds")
    me = resolve_identity(os.environ, rank=args.rank, tasks=args.tasks, node=args.node, rack=args.rack,
                          run_id=args.run_id, node_from=args.node_from)
    root = Path(args.results)
    barrier = Barrier(root, me, timeout_s=args.barrier_timeout_s, lead_s=args.start_lead_s)
    task = TaskRun(root, me, barrier)
    log.info("%s of rack %s, run %s (identity from %s)", me.describe(), me.rack, me.run_id,
             ", ".join(f"{k}: {v}" for k, v in me.sources.items()))
    try:
        args.rack, args.node, args.run_id = me.rack, me.node, me.run_id
        config = config_from_args(args)
        options = dataclasses.replace(run_options(args), output=task.record_path)
        task.claim(config)
        return task.execute(config, options)
    except BarrierOff:
        raise
    except BaseException as exc:
        # This task cannot take part: tell the others, and leave its own files final.
        reason = _reason(exc)
        if task.started_at is None:
            barrier.give_up(reason)
        task.finish("failed", reason)
        raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RackscopeError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    return f"{type(exc).__name__}: {exc}"


def add_task_flags(p: argparse.ArgumentParser) -> None:
    from rackscope.rack.barrier import DEFAULT_LEAD_S, DEFAULT_TIMEOUT_S
    from rackscope.rack.identity import NODE_FROM
    from rackscope.runner.config import parse_seconds

    t = p.add_argument_group("rack task (the workload flags are those of rackscope run)")
    t.add_argument("--results", required=True, metavar="DIR",
                   help="the run's shared results folder (one per run, on a file system every node sees)")
    t.add_argument("--rank", type=int, default=None,
                   help="this task's rank from 0 (default: RACKSCOPE_RANK, SLURM_PROCID or JOB_COMPLETION_INDEX)")
    t.add_argument("--tasks", type=int, default=None,
                   help="how many tasks take part (default: RACKSCOPE_TASKS or SLURM_NTASKS)")
    t.add_argument("--node-from", choices=NODE_FROM, default="name",
                   help="the node name as given (--node, RACKSCOPE_NODE or SLURMD_NODENAME), or with '-RANK' "
                        "appended, for several tasks per node")
    t.add_argument("--barrier-timeout", dest="barrier_timeout_s", type=parse_seconds, default=DEFAULT_TIMEOUT_S,
                   metavar="SECONDS", help="how long a task waits at the start barrier for the others; then the "
                                           "run is called off")
    t.add_argument("--start-lead", dest="start_lead_s", type=parse_seconds, default=DEFAULT_LEAD_S,
                   metavar="SECONDS", help="how far ahead of the last arrival the common start is set")


__all__ = ["NODE_FILE", "PER_NODE_SETTINGS", "RUN_FILE", "TaskNode", "TaskRun", "add_task_flags", "rack_settings_of",
           "record_name", "run_task"]
