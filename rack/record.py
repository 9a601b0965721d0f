"""The ``rackscope.rack/1`` record: per-node state (``NodeRun``), node entries, the record.

What the coordinator knows of each node becomes one entry of the record's ``nodes``; the
record wraps the rack summary (rack/aggregate.py) in identity, state and configuration."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rackscope import __version__
from rackscope.errors import ResultError
from rackscope.jsontypes import JsonDict
from rackscope.rack.aggregate import num, pooled_latency, rack_timeseries, summarize_nodes
from rackscope.rack.spec import DEFAULT_STRAGGLER_THRESHOLD
from rackscope.runner.config import RunConfig
from rackscope.runner.results.record import utc_iso
from rackscope.urls import redact_url

log = logging.getLogger(__name__)

SCHEMA = "rackscope.rack/1"
# A node's status while the coordinator still works on it ...
NODE_IN_PROGRESS = ("probing", "ready", "starting", "pending", "running")
# ... and once it is settled: the agent's own end of the run (completed, failed, cancelled) or
# the coordinator's verdict on a node that could not finish; ``missing``: a rack task (started
# by a scheduler, rack/collect.py) that left no files at all.
NODE_FINAL = ("completed", "failed", "cancelled", "lost", "timeout", "rejected", "unreachable", "missing")
RUN_FINAL = ("completed", "failed", "cancelled")  # final statuses of a run on an agent
# ``running`` is written while nodes are out; the others are final: ``finished`` (every node
# settled), ``interrupted`` (a signal), ``failed`` (the coordinator itself failed, or the tasks of
# a scheduled run called it off at their start barrier).
RECORD_STATES = ("running", "finished", "interrupted", "failed")


@dataclass
class NodeRun:
    """What the coordinator knows about one agent. ``status`` is one of ``NODE_IN_PROGRESS``
    or ``NODE_FINAL``: the agent's run status, or ``unreachable`` (never answered), ``rejected``
    (refused the run), ``lost`` (vanished mid-run), ``timeout`` (overran the deadline) or
    ``failed`` (also: hung, or answered what its API never does; ``error`` says which call)."""

    agent: str
    key: str = ""  # the node's folder in the bundle (its node name, made unique)
    identity: JsonDict | None = None
    status: str = "probing"
    error: str | None = None
    view: JsonDict | None = None
    record: JsonDict | None = None
    files: dict[str, str] = field(default_factory=dict)
    probe_rtt_s: float | None = None
    last_seen: float = 0.0  # monotonic time of the last answer
    # A start was sent and no end of the run has been seen since: the agent may be running it,
    # so stopping the rack run must cancel it there.
    maybe_running: bool = False

    @property
    def node(self) -> str:
        if self.identity and isinstance(self.identity.get("node"), str):
            return str(self.identity["node"])
        return self.key or redact_url(self.agent)

    @property
    def ok(self) -> bool:
        return self.status == "completed" and self.record is not None


def _gpu_count(value: Any) -> float | None:
    # The agent's /v1/node lists its GPUs; older callers give a count.
    return float(len(value)) if isinstance(value, list) else num(value)


def node_entry(n: NodeRun) -> JsonDict:
    """The per-node summary carried in the rack record's ``nodes`` list."""
    identity = n.identity or {}
    summary: Mapping[str, Any] = {}
    if n.record is not None and isinstance(n.record.get("summary"), dict):
        summary = n.record["summary"]
    elif n.view is not None and isinstance(n.view.get("summary"), dict):
        summary = n.view["summary"]
    view = n.view or {}
    gpus = num(summary.get("gpus"))
    if gpus is None:
        gpus = _gpu_count(identity.get("gpus"))
    return {
        "node": n.node,
        "key": n.key,
        "rack": identity.get("rack"),
        "agent": redact_url(n.agent),
        "status": n.status,
        "error": n.error,
        "run_id": view.get("run_id"),
        "gpus": int(gpus) if gpus is not None else None,
        "gpu_model": identity.get("gpu_model"),
        "simulated": identity.get("simulated"),
        "source": identity.get("source"),
        "started_at": num(view.get("started_at")),
        "ended_at": num(view.get("ended_at")),
        "duration_s": num(summary.get("duration_s")),
        "output_tokens": num(summary.get("output_tokens")),
        "output_tokens_per_s": num(summary.get("output_tokens_per_s")),
        "output_tokens_per_s_per_gpu": num(summary.get("output_tokens_per_s_per_gpu")),
        "requests_completed": num(summary.get("requests_completed")),
        "requests_failed": num(summary.get("requests_failed")),
        "energy_j": num(summary.get("energy_j")),
        "power_w": num(summary.get("average_power_w")),
        "output_tokens_per_j": num(summary.get("output_tokens_per_j")),
        "complete": summary.get("complete") is True and n.ok,
        "straggler": False,
        "fraction_of_median": None,
        "files": dict(n.files),
    }


def assemble_record(
    nodes: Sequence[NodeRun],
    *,
    rack_run_id: str,
    run: Mapping[str, Any],
    agents: Sequence[str],
    threshold: float = DEFAULT_STRAGGLER_THRESHOLD,
    bundle_root: Path | None = None,
    state: str = "finished",
    error: str | None = None,
    created_at: float | None = None,
    start_at: float | None = None,
    lead_time_s: float | None = None,
    ended_at: float | None = None,
) -> JsonDict:
    """The ``rackscope.rack/1`` record from what is known of each node. ``state`` is one of
    ``RECORD_STATES``; only a finished record can be complete, and ``error`` says why one was
    interrupted or failed. With ``bundle_root``, latency distributions are pooled from the
    nodes' per-request files in the bundle."""
    entries = [node_entry(n) for n in nodes]
    summary = summarize_nodes(entries, threshold=threshold)
    if state != "finished":
        summary["complete"] = False
    if state != "running" and bundle_root is not None:
        files = [
            bundle_root / e["files"]["requests"]
            for e in entries
            if e["status"] == "completed" and "requests" in e["files"]
        ]
        try:
            summary.update(pooled_latency(files))
        except ResultError as exc:
            log.warning("latency pooling skipped: %s", exc)
    records = {n.key: n.record for n in nodes if n.record is not None}
    racks = sorted({str(e["rack"]) for e in entries if e["rack"]})
    models = sorted({str(e["gpu_model"]) for e in entries if e["gpu_model"]})

    def iso(t: float | None) -> str | None:
        return None if t is None else utc_iso(datetime.fromtimestamp(t, UTC))

    return {
        "schema": SCHEMA,
        "rack_run_id": rack_run_id,
        "rack": ",".join(racks) or None,
        "state": state,
        "error": error,
        "created_at": iso(created_at),
        "start_at": start_at,
        "lead_time_s": lead_time_s,
        "ended_at": iso(ended_at),
        "config": {**RunConfig.public_body(run), "agents": [redact_url(a) for a in agents]},
        "environment": {
            "gpu_models": models,
            "simulated": any(bool(e["simulated"]) for e in entries),
            "rackscope_version": __version__,
        },
        "summary": summary,
        "timeseries": rack_timeseries(entries, records),
        "nodes": entries,
    }


def exit_code(record: Mapping[str, Any]) -> int:
    """0 when every node completed, 1 otherwise."""
    return 0 if record.get("summary", {}).get("complete") else 1


__all__ = [
    "NODE_FINAL",
    "NODE_IN_PROGRESS",
    "RECORD_STATES",
    "RUN_FINAL",
    "SCHEMA",
    "NodeRun",
    "assemble_record",
    "exit_code",
    "node_entry",
]
