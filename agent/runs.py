"""Benchmark runs hosted by an agent: started from the API (one at a time) or run
continuously for demos, with their records written under the results directory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, HTTPException, Response
from fastapi.params import Depends

from rackscope.agent.run_models import RunBody
from rackscope.errors import ConfigError, RackscopeError, RunConflict

if TYPE_CHECKING:
    from rackscope.agent.node import NodeAgent
    from rackscope.runner.engines.base import Engine
    from rackscope.runner.results import RunResult

log = logging.getLogger(__name__)

MAX_KEPT_RUNS = 100  # finished runs kept in memory for GET /v1/runs


@dataclass
class RunState:
    run_id: str
    config: dict[str, Any]
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
    """One run at a time per agent; a second start is a ``RunConflict`` (HTTP 409)."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.runs: dict[str, RunState] = {}
        self.results_dir = "results"

    @property
    def active(self) -> RunState | None:
        return next((r for r in self.runs.values() if r.status in ("pending", "running")), None)

    # --- engines -------------------------------------------------------------------------
    def _engine(self, config: Any) -> Engine:
        """Streaming engines only: the sim engine runs on this node's own simulated GPUs."""
        if config.engine == "sim":
            from rackscope.runner.engines.sim import SimEngine

            gpus = self.agent.require_sim("the sim engine")
            return SimEngine(gpus, self.agent.clock, model=config.model, engine_slowdown=self.agent.engine_slowdown,
                             warm_start=config.sim_warm_start, seed=config.seed)
        if config.engine == "openai":
            from rackscope.runner.engines.openai import OpenAIEngine

            try:
                return OpenAIEngine(
                    config.url,
                    config.model,
                    "chat" if config.api == "chat" else "completions",
                    config.api_key,
                    timeout_s=config.request_timeout_s,
                )
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        if config.engine == "trtllm":
            from rackscope.runner.engines.trtllm import TrtllmEngine

            return TrtllmEngine(config.model)
        if config.engine == "hf":
            from rackscope.runner.engines.hf import HfEngine

            return HfEngine(config.model)
        raise ConfigError(f"engine {config.engine!r} cannot run inside the agent; use `rackscope run`")

    def set_engine_slowdown(self, factor: float) -> None:
        active = self.active
        if active is not None and active.engine is not None and hasattr(active.engine, "engine_slowdown"):
            active.engine.engine_slowdown = factor

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, body: dict[str, Any], continuous: bool = False) -> RunState:
        from rackscope.runner.scenarios import RunConfig

        if (active := self.active) is not None:
            raise RunConflict(f"run {active.run_id} is {active.status}; cancel it or wait (one run per agent)")
        run_id = str(body.get("run_id") or uuid.uuid4().hex[:12])
        if run_id in self.runs:
            raise RunConflict(f"run id {run_id} already used")
        start_at = body.get("start_at")
        if start_at is not None and not time.time() - 5.0 <= float(start_at) <= time.time() + 3600.0:
            raise ConfigError("start_at must be unix seconds within the next hour")
        fields = {k: v for k, v in body.items() if k != "start_at"}
        config = RunConfig.from_dict(
            {**fields, "run_id": run_id, "rack": self.agent.identity.rack, "node": self.agent.identity.node}
        )
        state = RunState(run_id=run_id, config=config.to_dict(), continuous=continuous, start_at=start_at)
        state.engine = self._engine(config)
        self.runs[state.run_id] = state
        state.task = asyncio.create_task(self._execute(state, config), name=f"run-{state.run_id}")
        self._forget_old()
        return state

    def start_continuous(self, workload: str, *, concurrency: int = 256, rate: float | None = None) -> RunState:
        """Run the simulated engine on this node's own GPUs until the agent stops."""
        body: dict[str, Any] = {"engine": "sim", "scenario": workload, "duration_s": None, "requests": None,
                                "sim_warm_start": True, "length_dist": "lognormal"}
        if workload == "concurrency":
            body["concurrency"] = concurrency
        if workload == "server":
            body["rate"] = rate
        return self.start(body, continuous=True)

    async def _execute(self, state: RunState, config: Any) -> None:
        from rackscope.runner.results import write_run
        from rackscope.runner.scenarios import run_scenario

        assert state.engine is not None
        engine = state.engine
        try:
            await engine.start()
            if state.start_at is not None:
                delay = state.start_at - time.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(state.cancel.wait(), delay)
            state.status, state.started_at = "running", time.time()
            result = await run_scenario(
                engine, config, energy=self.agent.energy_meter(), meter=self.agent.telemetry.meter, cancel=state.cancel
            )
            state.result, state.summary = result, result.summary
            state.status = (
                "cancelled"
                if state.cancel.is_set()
                else ("completed" if result.summary.get("complete", True) else "failed")
            )
            if not state.continuous:
                path = Path(self.results_dir) / f"{state.run_id}.json"
                await asyncio.to_thread(write_run, result, path)
                state.record_path = str(path)
        except RackscopeError as exc:
            state.status, state.error = "failed", str(exc)
            log.error("run %s failed: %s", state.run_id, exc)
        except asyncio.CancelledError:
            state.status = "cancelled"
            raise
        except Exception as exc:  # task boundary: a failing run must never take the agent down
            state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("run %s crashed", state.run_id)
        finally:
            state.ended_at = time.time()
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
            raise HTTPException(status_code=404, detail=f"no run {run_id!r}") from None

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

    # --- HTTP ----------------------------------------------------------------------------
    def add_routes(self, app: FastAPI, mutating: Sequence[Depends]) -> None:
        from rackscope.runner.results import requests_path

        @app.post("/v1/runs", status_code=201, dependencies=list(mutating), summary="Start a benchmark run")
        async def start_run(body: RunBody) -> dict[str, Any]:  # type: ignore[valid-type]
            try:
                return self.start(body.model_dump(exclude_none=True)).view()  # type: ignore[attr-defined]
            except ConfigError as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from exc

        @app.get("/v1/runs", summary="Runs this agent knows, newest first")
        async def list_runs() -> list[dict[str, Any]]:
            return [r.view() for r in sorted(self.runs.values(), key=lambda r: -r.created_at)]

        @app.get("/v1/runs/{run_id}", summary="One run: status, config, summary")
        async def get_run(run_id: str) -> dict[str, Any]:
            return self.get(run_id).view()

        @app.get("/v1/runs/{run_id}/record", summary="The finished run's record (schema rackscope.run/1)")
        async def get_record(run_id: str) -> dict[str, Any]:
            state = self.get(run_id)
            if state.result is None:
                raise HTTPException(status_code=409, detail=f"run {run_id} is {state.status}: no record yet")
            name = Path(state.record_path).name if state.record_path else f"{run_id}.json"
            # Building a big run's record takes a while: off the event loop the node keeps sampling.
            return await asyncio.to_thread(state.result.to_record, requests_file=requests_path(Path(name)).name)

        @app.get("/v1/runs/{run_id}/requests", summary="The finished run's per-request rows (JSON lines)")
        async def get_requests(run_id: str) -> Response:
            state = self.get(run_id)
            if state.result is None:
                raise HTTPException(status_code=409, detail=f"run {run_id} is {state.status}: no record yet")
            result = state.result
            body = await asyncio.to_thread(lambda: b"".join(orjson.dumps(r) + b"\n" for r in result.request_rows()))
            return Response(content=body, media_type="application/x-ndjson")

        @app.post("/v1/runs/{run_id}/cancel", dependencies=list(mutating), summary="Cancel a run")
        async def cancel_run(run_id: str) -> dict[str, Any]:
            return self.cancel(run_id).view()
