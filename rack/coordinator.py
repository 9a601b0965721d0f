"""Rack runs: one synchronized benchmark run across many agents over their control API.

The coordinator probes every agent (``GET /v1/node``), picks a common start time far enough
ahead to reach them all, and then drives each node on its own: start the run there (``POST
/v1/runs`` with ``start_at``), poll it, and collect its record, per-request rows and log as it
finishes. Nodes never wait on each other: a node that refuses, hangs, vanishes or answers what
the agent's API never does is marked (its status, and the call that went wrong) and the others
carry on. Every call has a deadline and a size cap, every answer a schema (rack/client.py).

Whatever stops the run early (a signal, an error in the coordinator itself) cancels the runs
it may have started on the agents, within a bounded time, and finalizes the bundle:
``rack.json`` is never left ``running``. The bundle's layout is in rack/bundle.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from rackscope import __version__
from rackscope.errors import ConfigError, PeerError, RackscopeError, ResultError, RunError
from rackscope.jsontypes import JsonDict
from rackscope.rack.bundle import CONFIG_FILE, RACK_FILE, Bundle, node_file, safe_name
from rackscope.rack.client import AgentClient, AgentHung, AgentUnreachable, BadAnswer, Refusal, printable
from rackscope.rack.record import NODE_IN_PROGRESS, RUN_FINAL, SCHEMA, NodeRun, assemble_record
from rackscope.rack.spec import RackRunSpec
from rackscope.runner.results.record import RowsDigest, utc_iso
from rackscope.urls import redact_url

log = logging.getLogger(__name__)

MIN_LEAD_TIME_S = 1.0  # even on loopback, every POST must land before the common start
LEAD_TIME_RTT_FACTOR = 10.0  # start_at = now + max(MIN, factor x slowest probe + per-agent cost)
LEAD_TIME_PER_AGENT_S = 0.02  # starting a run (engine set-up) costs each agent a little
RECORD_WAIT_S = 10.0  # after a run ends, how long its record may take to appear
RECORD_ATTEMPTS = 3  # the record is asked for this often while the agent answers 409 (not yet)
RECORD_RETRY_S = 0.5
# Waiting on the agents' cancel answers stops this long after their own deadline at the latest.
CANCEL_MARGIN_S = 0.5
MAX_ERROR_CHARS = 2000


class RackRun:
    """One synchronized run across agents. ``run()`` returns the rack record; ``nodes`` can be
    read while it runs (the demo's view does), and ``interrupt()`` stops it (a signal)."""

    def __init__(self, spec: RackRunSpec, *, on_change: Callable[[RackRun], None] | None = None) -> None:
        self.spec = spec.validate()
        self.nodes = [NodeRun(agent=a) for a in spec.agents]
        self.bundle: Bundle | None = None
        self.on_change = on_change
        self.created_at = time.time()
        self.start_at: float | None = None
        self.lead_time_s: float | None = None
        self.ended_at: float | None = None
        self.state = "running"
        self.error: str | None = None
        self.record: JsonDict | None = None
        self._clients: dict[str, AgentClient] = {}
        self._config_refusals: list[str] = []
        self._task: asyncio.Task[Any] | None = None
        self._stop_reason: str | None = None
        self._hurry = asyncio.Event()

    # --- public ------------------------------------------------------------------------------
    def interrupt(self, reason: str = "interrupted") -> None:
        """Stop the run from outside (a signal handler). The first call cancels ``run()``, which
        then cancels the agents' runs and finalizes the bundle; a later call stops waiting for
        the agents to answer those cancels."""
        if self._stop_reason is None:
            self._stop_reason = reason
            if self._task is not None and not self._task.done():
                self._task.cancel()
        else:
            self._hurry.set()

    async def run(self) -> JsonDict:
        import aiohttp

        self._task = asyncio.current_task()
        if self._stop_reason is not None:
            raise asyncio.CancelledError  # interrupted before it began: nothing to undo
        self.bundle = Bundle(self.spec.output_dir)
        self.bundle.write_json(CONFIG_FILE, self._config())
        # Deadlines are per call (asyncio.timeout in the client), not per session.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout())
        async with session:
            self._clients = {
                n.agent: AgentClient(
                    session,
                    n.agent,
                    token=self.spec.token,
                    call_timeout_s=self.spec.call_timeout_s,
                    collect_timeout_s=self.spec.collect_timeout_s,
                    caps=self.spec.caps,
                )
                for n in self.nodes
            }
            try:
                outcome = await self._run_nodes()
                self._finish("finished")
            except BaseException as exc:
                # The run's boundary: whatever ends it early, the agents must not be left
                # running and the bundle must say how it ended.
                await self._abort(exc)
                raise
        if outcome is not None:
            raise outcome
        assert self.record is not None
        return self.record

    def build_record(self) -> JsonDict:
        return assemble_record(
            self.nodes,
            rack_run_id=self.spec.rack_run_id,
            run=self.spec.run,
            agents=self.spec.agents,
            threshold=self.spec.straggler_threshold,
            bundle_root=self.bundle.root if self.bundle is not None else None,
            state=self.state,
            error=self.error,
            created_at=self.created_at,
            start_at=self.start_at,
            lead_time_s=self.lead_time_s,
            ended_at=self.ended_at,
        )

    # --- phases ------------------------------------------------------------------------------
    async def _run_nodes(self) -> RackscopeError | None:
        """Probe, then drive every node that answered; the error the run ends with, if any."""
        await self._probe_all()
        self._assign_keys()
        ready = [n for n in self.nodes if n.status == "ready"]
        if not ready:
            self._changed()
            return RunError("no agent answered: " + "; ".join(f"{redact_url(n.agent)}: {n.error}" for n in self.nodes))
        body = self._plan_start(ready)
        for n in ready:
            n.status = "starting"
        self._changed()
        tasks = [asyncio.create_task(self._drive(n, body), name=f"rack node {n.key}") for n in ready]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and (exc := task.exception()) is not None:
                    raise exc
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._config_refusals and len(self._config_refusals) == len(ready):
            return ConfigError(f"the agents rejected the run config: {self._config_refusals[0]}")
        return None

    async def _probe_all(self) -> None:
        async def probe(n: NodeRun) -> None:
            t0 = time.monotonic()
            try:
                identity = await self._clients[n.agent].identity()
            except AgentHung as exc:
                self._fail(n, "failed", str(exc))
                return
            except AgentUnreachable as exc:
                self._fail(n, "unreachable", str(exc))
                return
            except BadAnswer as exc:
                self._fail(n, "failed", str(exc))
                return
            n.probe_rtt_s = time.monotonic() - t0
            n.last_seen = time.monotonic()
            n.identity = identity
            n.status = "ready"

        await asyncio.gather(*(probe(n) for n in self.nodes))

    def _assign_keys(self) -> None:
        used: set[str] = set()
        for i, n in enumerate(self.nodes, start=1):
            base = safe_name(n.node if n.identity else f"agent{i:02d}")
            key, k = base, 2
            while key in used:
                key, k = f"{base}-{k}", k + 1
            used.add(key)
            n.key = key
            if n.identity is not None:
                self._save(n, "node.json", n.identity)

    def _plan_start(self, ready: list[NodeRun]) -> JsonDict:
        """The common start time, far enough ahead for every start to land; the start body."""
        slowest = max(n.probe_rtt_s or 0.0 for n in ready)
        lead = self.spec.lead_time_s
        if lead is None:
            lead = max(MIN_LEAD_TIME_S, LEAD_TIME_RTT_FACTOR * slowest + LEAD_TIME_PER_AGENT_S * len(ready))
        self.lead_time_s = lead
        self.start_at = time.time() + lead
        log.info(
            "starting run %s on %d agent(s) at %s (lead %.2f s)",
            self.spec.rack_run_id,
            len(ready),
            utc_iso(datetime.fromtimestamp(self.start_at, UTC)),
            lead,
        )
        return {**self.spec.run, "run_id": self.spec.rack_run_id, "start_at": self.start_at}

    async def _drive(self, n: NodeRun, body: JsonDict) -> None:
        """One node from start to collected, on its own: nothing here waits on another node."""
        try:
            collect = await self._start(n, body) and await self._follow(n)
            if n.maybe_running:
                await self._cancel_one(n)
            if collect:
                await self._collect(n)
        except RackscopeError as exc:
            # This node's boundary: a file of its own that cannot be written, or an answer no
            # check anticipated, fails this node alone.
            self._fail(n, "failed", str(exc))
            if n.maybe_running:
                await self._cancel_one(n)
        self._changed()

    async def _start(self, n: NodeRun, body: JsonDict) -> bool:
        """``POST /v1/runs``; whether the agent took the run."""
        n.maybe_running = True  # from here on the start may have landed, whatever comes back
        try:
            answer = await self._clients[n.agent].start(body, self.spec.rack_run_id)
        except AgentHung as exc:
            self._fail(n, "failed", str(exc))
            return False
        except AgentUnreachable as exc:
            self._fail(n, "unreachable", str(exc))
            return False
        except BadAnswer as exc:
            self._fail(n, "failed", str(exc))
            return False
        if isinstance(answer, Refusal):
            n.maybe_running = False
            reason = {401: "unauthorized (check --token)", 409: "busy"}.get(answer.status, f"HTTP {answer.status}")
            self._fail(n, "rejected", f"{reason}: {answer.detail}")
            if answer.status in (400, 422):
                self._config_refusals.append(answer.detail)
            return False
        self._seen(n, answer)
        return True

    async def _follow(self, n: NodeRun) -> bool:
        """Poll one node until its run ends, it is lost, fails or overruns; whether the agent is
        there to collect from."""
        client = self._clients[n.agent]
        run_id = self.spec.rack_run_id
        limit = self.spec.deadline_after_start_s()
        assert self.start_at is not None
        deadline = None if limit is None else self.start_at + limit
        record_wait_until: float | None = None
        while True:
            await asyncio.sleep(self.spec.poll_interval_s)
            try:
                view = await client.view(run_id)
            except BadAnswer as exc:
                self._fail(n, "failed", str(exc))
                return False
            except AgentUnreachable as exc:
                if time.monotonic() - n.last_seen > self.spec.lost_after_s:
                    self._fail(n, "lost", f"agent stopped answering for {self.spec.lost_after_s:g} s: {exc}")
                    return False
                continue
            self._seen(n, view)
            status = str(view["status"])
            if status in RUN_FINAL:
                n.maybe_running = False
                # The record is written after the status changes; give it a moment.
                if view.get("record_path") or status != "completed" or view.get("error"):
                    n.status = status
                    if view.get("error"):
                        n.error = printable(str(view["error"]), MAX_ERROR_CHARS)
                    return True
                if record_wait_until is None:
                    record_wait_until = time.monotonic() + RECORD_WAIT_S
                elif time.monotonic() > record_wait_until:
                    n.status = status
                    return True
            if deadline is not None and time.time() > deadline:
                self._fail(n, "timeout", f"run still {status} {limit:g} s after the common start; cancelled")
                return True

    async def _collect(self, n: NodeRun) -> None:
        """Fetch a finished node's record, request rows and log; each is saved on arrival."""
        assert self.bundle is not None
        client = self._clients[n.agent]
        run_id = name = self.spec.rack_run_id  # the spec checked it is a safe file name
        for attempt in range(RECORD_ATTEMPTS):
            try:
                got = await client.record(run_id)
            except PeerError as exc:
                self._note(n, f"record not collected: {exc}")
                break
            if got is not None:
                n.record, payload = got
                rel = node_file(n.key, f"{name}.json")
                self.bundle.write_bytes(rel, payload)
                n.files["record"] = rel
                break
            if attempt + 1 < RECORD_ATTEMPTS:
                await asyncio.sleep(RECORD_RETRY_S)
            elif n.status == "completed":
                self._note(n, "record not collected: the agent has none (HTTP 409)")
        if n.record is not None:
            rel = node_file(n.key, f"{name}.requests.jsonl")
            try:
                digest = RowsDigest.from_record(n.record, "the record")
                if await client.requests(run_id, self.bundle.prepare(rel), digest) is not None:
                    n.files["requests"] = rel
            except (PeerError, ResultError) as exc:
                self._note(n, f"requests not collected: {exc}")
        if n.status == "completed" and n.record is None:
            n.status = "failed"
        try:
            self.bundle.write_bytes(node_file(n.key, "agent.log"), await client.logs())
            n.files["log"] = node_file(n.key, "agent.log")
        except PeerError as exc:
            log.info("node %s: log not collected: %s", n.node, exc)
        summary = n.record.get("summary") if n.record is not None else None
        if isinstance(summary, dict) and summary.get("complete") is False and n.status == "completed":
            self._note(n, f"run incomplete: {printable(str(summary.get('stop_reason', 'unknown reason')))}")

    async def _cancel_one(self, n: NodeRun) -> None:
        """Ask the agent to cancel our run (bounded); notes when that is not confirmed."""
        try:
            await self._clients[n.agent].cancel(self.spec.rack_run_id, self.spec.cancel_timeout_s)
        except PeerError as exc:
            self._note(n, f"cancel not confirmed: {exc}")
            return
        n.maybe_running = False

    # --- ending early ------------------------------------------------------------------------
    async def _abort(self, exc: BaseException) -> None:
        """Interrupted or failed: cancel what may run on the agents, then finalize the bundle."""
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            state, reason = "interrupted", self._stop_reason or "interrupted"
        else:
            state, reason = "failed", f"the coordinator failed: {type(exc).__name__}: {exc}"
            log.error("rack run %s: %s", self.spec.rack_run_id, reason)
        for n in self.nodes:
            if n.status in NODE_IN_PROGRESS:
                started = n.status in ("starting", "pending", "running")
                n.status = "cancelled"
                self._note(n, f"rack run {state}: {reason}" + ("" if started else " (before this node started)"))
        # In a task of its own, so the cancellation that brought us here cannot cut it short.
        cleanup = asyncio.ensure_future(self._cancel_started())
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(cleanup)
        self._finish(state, reason)

    async def _cancel_started(self) -> None:
        """Cancel every run that may be running on an agent, all at once, until they answer,
        their deadline passes or a second interrupt says to stop waiting."""
        targets = {asyncio.ensure_future(self._cancel_one(n)): n for n in self.nodes if n.maybe_running}
        if not targets:
            return
        everything: asyncio.Future[list[None]] = asyncio.gather(*targets)
        hurry: asyncio.Future[Any] = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait(
                {everything, hurry},
                timeout=self.spec.cancel_timeout_s + CANCEL_MARGIN_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            hurry.cancel()
            for task, n in targets.items():
                if not task.done():
                    task.cancel()
                    self._note(n, "cancel not confirmed: stopped waiting for the agent's answer")
            await asyncio.gather(everything, return_exceptions=True)

    # --- records -----------------------------------------------------------------------------
    def _seen(self, n: NodeRun, view: JsonDict) -> None:
        """A valid view of the node's run arrived."""
        n.last_seen = time.monotonic()
        if view != n.view:
            n.view = view
            self._save(n, "run.json", view)
        status = view["status"]
        if status in ("pending", "running") and status != n.status:
            n.status = status
            self._changed()

    def _fail(self, n: NodeRun, status: str, message: str) -> None:
        n.status = status
        self._note(n, message)

    def _note(self, n: NodeRun, message: str) -> None:
        log.warning("node %s (%s): %s", n.node, n.status, message)
        n.error = printable(f"{n.error}; {message}" if n.error else message, MAX_ERROR_CHARS)

    def _save(self, n: NodeRun, name: str, obj: Any) -> None:
        assert self.bundle is not None
        rel = node_file(n.key or safe_name(n.agent), name)
        self.bundle.write_json(rel, obj)
        n.files[name.split(".", maxsplit=1)[0]] = rel

    def _changed(self) -> None:
        """A node's status changed: rewrite rack.json, then tell whoever watches."""
        self._save_rack()
        if self.on_change is not None:
            self.on_change(self)

    def _save_rack(self) -> None:
        self.record = self.build_record()
        if self.bundle is not None:
            self.bundle.write_json(RACK_FILE, self.record)

    def _finish(self, state: str, error: str | None = None) -> None:
        self.state, self.error = state, error
        self.ended_at = time.time()
        self._save_rack()

    def _config(self) -> JsonDict:
        caps = self.spec.caps
        return {
            "schema": SCHEMA,
            "rack_run_id": self.spec.rack_run_id,
            "agents": [redact_url(a) for a in self.spec.agents],
            "run": self.spec.run,
            "token": "set" if self.spec.token else None,
            "lead_time_s": self.spec.lead_time_s,
            "poll_interval_s": self.spec.poll_interval_s,
            "lost_after_s": self.spec.lost_after_s,
            "call_timeout_s": self.spec.call_timeout_s,
            "collect_timeout_s": self.spec.collect_timeout_s,
            "cancel_timeout_s": self.spec.cancel_timeout_s,
            "answer_caps_bytes": {
                "answer": caps.answer_bytes,
                "record": caps.record_bytes,
                "requests": caps.requests_bytes,
                "log": caps.log_bytes,
            },
            "straggler_threshold": self.spec.straggler_threshold,
            "timeout_s": self.spec.timeout_s,
            "created_at": utc_iso(datetime.fromtimestamp(self.created_at, UTC)),
            "rackscope_version": __version__,
        }


__all__ = ["RackRun"]
