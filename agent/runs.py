"""Benchmark runs hosted by an agent: started through the control API (one at a time) or run
continuously for demos, with their records written under the results directory.

No HTTP here: a bad request is a ``ConfigError``, a busy agent or a run id already used a
``RunConflict``, an unknown run a ``RunNotFound``; ``rackscope.agent.api`` maps them to status
codes. What a caller names is resolved here: a dataset only inside the operator's data
directory, a record only as ``<results dir>/<run id>.json``, created exclusively.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from rackscope.errors import ConfigError, RackscopeError, RunConflict, RunError, RunNotFound
from rackscope.runner.config import RunConfig
from rackscope.runner.engines.base import Slowable
from rackscope.runner.engines.registry import engine_spec
from rackscope.urls import has_credentials, redact_in

if TYPE_CHECKING:
    from rackscope.agent.node import NodeAgent
    from rackscope.runner.datasets import Dataset
    from rackscope.runner.engines.base import Engine
    from rackscope.runner.results.record import RunResult

log = logging.getLogger(__name__)

MAX_KEPT_RUNS = 100  # finished runs kept in memory for GET /v1/runs
# A rack run's common start: a little in the past (clock skew, slow delivery) up to an hour ahead.
START_AT_PAST_S = 5.0
START_AT_AHEAD_S = 3600.0
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


@dataclass
class RunState:
    run_id: str
    config: dict[str, Any]  # as the record shows it: secrets out, URLs redacted
    status: str = "pending"  # pending, running, completed, failed, cancelled
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    summary: dict[str, Any] | None = None
    record_path: str | None = None
    error: str | None = None
    continuous: bool = False
    start_at: float | None = None  # unix seconds: a rack run starts every node together
    result: RunResult | None = field(default=None, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    cancel: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    engine: Engine | None = field(default=None, repr=False)
    reserved: Path | None = field(default=None, repr=False)  # the record's name, claimed at start

    def view(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "continuous": self.continuous,
            "start_at": self.start_at,
            "config": self.config,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "summary": self.summary,
            "record_path": self.record_path,
            "error": self.error,
        }


class RunManager:
    """One run at a time per agent; a second start is a ``RunConflict``."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.runs: dict[str, RunState] = {}
        self.results_dir = "results"

    @property
    def active(self) -> RunState | None:
        return next((r for r in self.runs.values() if r.status in ("pending", "running")), None)

    # --- what a caller names ---------------------------------------------------------------
    def config_from_body(self, body: Mapping[str, Any]) -> tuple[RunConfig, float | None]:
        """A request body as a validated config (this node's identity, a run id) and its
        ``start_at``; ``ConfigError`` otherwise. Checked before anything else, busy or not."""
        fields = dict(body)
        start_at = fields.pop("start_at", None)
        run_id = fields.get("run_id") or uuid.uuid4().hex[:12]
        config = RunConfig.from_dict(
            {**fields, "run_id": run_id, "rack": self.agent.identity.rack, "node": self.agent.identity.node}
        )
        if config.workers > 1:
            raise ConfigError("workers > 1 runs through `rackscope run --workers`, not inside the agent")
        if not engine_spec(config.engine).streaming:
            raise ConfigError(f"engine {config.engine!r} cannot run inside the agent; use `rackscope run`")
        if start_at is not None:
            now = time.time()
            if isinstance(start_at, bool) or not isinstance(start_at, int | float) or not (
                now - START_AT_PAST_S <= start_at <= now + START_AT_AHEAD_S
            ):
                raise ConfigError("start_at must be unix seconds within the next hour")
            start_at = float(start_at)
        return config, start_at

    def load_dataset(self, config: RunConfig) -> Dataset | None:
        """The dataset a caller named, read only from inside the data directory (blocking)."""
        from rackscope.runner.datasets import load_dataset

        if not config.dataset:
            return None
        settings = self.agent.settings
        if settings.data_dir is None:
            raise ConfigError(
                "this agent grants no data directory, so runs may not name dataset files: start it with "
                "--data-dir DIR (or RACKSCOPE_DATA_DIR) and name a file inside DIR"
            )
        return load_dataset(config.dataset, config.dataset_format, root=settings.data_dir,
                            max_bytes=settings.dataset_max_mib * 2**20)

    def _checkpoint(self, model: str) -> str:
        """What a checkpoint engine loads for a ``model`` a caller named: a path inside the data
        directory when one is there, else a hub id; never any other path on this machine."""
        data_dir = self.agent.settings.data_dir
        relative = PurePosixPath(model)
        if data_dir is not None and model and not relative.is_absolute() and ".." not in relative.parts:
            root = os.path.realpath(data_dir)
            real = os.path.realpath(os.path.join(root, model))
            if real != root and os.path.commonpath([root, real]) == root and os.path.exists(real):
                return real
        if HUB_ID.fullmatch(model):
            return model
        raise ConfigError(
            "model for the trtllm and hf engines must be a hub id (org/name) or a checkpoint inside the "
            "agent's --data-dir"
        )

    def _reserve(self, run_id: str) -> Path:
        """Claim ``<results dir>/<run id>.json`` by creating it exclusively (empty until the
        record replaces it), so no run ever overwrites another's files."""
        from rackscope.runner.results.io import requests_path

        directory = Path(self.results_dir)
        path = directory / f"{run_id}.json"
        taken = RunConflict(f"run id {run_id} already used: its files are in the results directory")
        if os.path.lexists(requests_path(path)):
            raise taken
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise taken from None
        except OSError as exc:
            raise RunError(f"cannot write to the results directory: {exc.strerror or exc}") from exc
        os.close(fd)
        return path

    # --- engines -------------------------------------------------------------------------
    def _engine(self, config: RunConfig) -> Engine:
        """The run's engine, from the engine registry: a simulated one runs on this node's own
        simulated GPUs and clock; a checkpoint engine loads only what ``_checkpoint`` allows."""
        from rackscope.runner.engines.registry import EngineOptions, build_engine

        spec = engine_spec(config.engine)
        options = EngineOptions(
            clock=self.agent.clock,
            gpus=self.agent.require_sim(f"the {spec.name} engine") if spec.simulated else None,
            engine_slowdown=self.agent.engine_slowdown,
        )
        if spec.needs_checkpoint:
            config = dataclasses.replace(config, model=self._checkpoint(config.model))
        return build_engine(config, options).engine

    def set_engine_slowdown(self, factor: float) -> None:
        active = self.active
        if active is not None and isinstance(active.engine, Slowable):
            active.engine.engine_slowdown = factor

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self, body: Mapping[str, Any]) -> RunState:
        """Validate a request body, read its dataset, then start it if this agent is free."""
        config, start_at = self.config_from_body(body)
        dataset = await asyncio.to_thread(self.load_dataset, config) if config.dataset else None
        return self._launch(config, start_at=start_at, dataset=dataset)

    def start_continuous(self, workload: str, *, concurrency: int = 256, rate: float | None = None) -> RunState:
        """Run the simulated engine on this node's own GPUs until the agent stops."""
        body: dict[str, Any] = {"engine": "sim", "scenario": workload, "duration_s": None, "requests": None,
                                "sim_warm_start": True, "length_dist": "lognormal"}
        if workload == "concurrency":
            body["concurrency"] = concurrency
        if workload == "server":
            body["rate"] = rate
        config, _ = self.config_from_body(body)
        return self._launch(config, continuous=True)

    def _launch(
        self, config: RunConfig, *, start_at: float | None = None, dataset: Dataset | None = None,
        continuous: bool = False,
    ) -> RunState:
        # Nothing awaits between these checks and registering the run: two starts cannot both pass.
        run_id = config.run_id
        assert run_id is not None
        engine = self._engine(config)
        if (active := self.active) is not None:
            raise RunConflict(f"run {active.run_id} is {active.status}; cancel it or wait (one run per agent)")
        if run_id in self.runs:
            raise RunConflict(f"run id {run_id} already used on this agent")
        state = RunState(run_id=run_id, config=config.to_dict(), continuous=continuous, start_at=start_at)
        state.reserved = None if continuous else self._reserve(run_id)
        state.engine = engine
        self.runs[run_id] = state
        state.task = asyncio.create_task(self._execute(state, config, dataset), name=f"run-{run_id}")
        self._forget_old()
        return state

    async def _execute(self, state: RunState, config: RunConfig, dataset: Dataset | None) -> None:
        from rackscope.runner.results.io import write_run
        from rackscope.runner.runloop import run_scenario
        from rackscope.runner.server_view import ServerWatch, end_watch, watch_run

        assert state.engine is not None
        engine = state.engine
        watch: ServerWatch | None = None
        try:
            await engine.start()
            # The record's server section: the page the operator named, else the server's own.
            watch = await watch_run(config, engine, page=self.agent.engine_metrics.configured_url)
            if state.start_at is not None:
                delay = state.start_at - time.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(state.cancel.wait(), delay)
            state.status, state.started_at = "running", time.time()
            # The server's own metrics page is read while this run loads it (unless the operator
            # named a page for the agent's whole life).
            with self.agent.engine_metrics.follow(config.url if config.engine == "openai" else None, config.model):
                result = await run_scenario(
                    engine, config, energy=self.agent.energy_meter(), meter=self.agent.telemetry.meter,
                    cancel=state.cancel, dataset=dataset,
                )
            if watch is not None:
                ending: ServerWatch = watch
                watch = None  # ended here: the finally below has nothing left to stop
                await end_watch(ending, config, result)
            final = (
                "cancelled"
                if state.cancel.is_set()
                else ("completed" if result.summary.get("complete", True) else "failed")
            )
            state.result, state.summary = result, result.summary
            if state.reserved is not None:
                await asyncio.to_thread(write_run, result, state.reserved)
                state.record_path, state.reserved = str(state.reserved), None
            # The status turns final last: whoever sees it (a rack coordinator polling) finds the
            # record written and the end time set.
            state.ended_at = time.time()
            state.status = final
        except RackscopeError as exc:
            state.status, state.error = "failed", redact_in(str(exc), config.url)
            log.error("run %s failed: %s", state.run_id, state.error)
        except asyncio.CancelledError:
            state.status = "cancelled"
            raise
        except Exception as exc:  # task boundary: a failing run must never take the agent down
            state.status, state.error = "failed", redact_in(f"{type(exc).__name__}: {exc}", config.url)
            # A traceback would repeat the message unredacted; without credentials, keep it.
            log.error("run %s crashed: %s", state.run_id, state.error,
                      exc_info=not (config.url and has_credentials(config.url)))
        finally:
            if watch is not None:  # the run ended early: stop reading the page, no section
                with contextlib.suppress(Exception):
                    await end_watch(watch, config, None)
            if state.ended_at is None:
                state.ended_at = time.time()
            if state.reserved is not None:  # no record written: free the name it claimed
                _release(state.reserved)
                state.reserved = None
            with contextlib.suppress(Exception):
                await engine.stop()

    def cancel(self, run_id: str) -> RunState:
        state = self.get(run_id)
        if state.status in ("pending", "running"):
            state.cancel.set()
        return state

    def get(self, run_id: str) -> RunState:
        try:
            return self.runs[run_id]
        except KeyError:
            raise RunNotFound(f"no run {run_id!r} on this agent") from None

    def views(self) -> list[dict[str, Any]]:
        """Every run this agent knows, newest first."""
        return [r.view() for r in sorted(self.runs.values(), key=lambda r: -r.created_at)]

    def _forget_old(self) -> None:
        finished = [r for r in self.runs.values() if r.status not in ("pending", "running")]
        for old in finished[: max(0, len(self.runs) - MAX_KEPT_RUNS)]:
            del self.runs[old.run_id]

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Cancel the active run and wait for its partial record."""
        tasks = [r.task for r in self.runs.values() if r.task is not None and not r.task.done()]
        for state in self.runs.values():
            state.cancel.set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()


def _release(path: Path) -> None:
    """Remove a claimed record name that never received its record (still empty)."""
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            path.unlink()
