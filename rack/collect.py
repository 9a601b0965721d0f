"""``rackscope rack collect``: the rack record of a run whose tasks a scheduler started.

The tasks (rack/task.py) leave their files in the shared results folder in the layout of a
rack run's bundle (rack/bundle.py); this reads them and writes ``config.json`` and
``rack.json`` beside them, through the same record assembly as ``rackscope rack run``
(rack/record.py), so ``rackscope report`` and ``compare`` read either bundle alike.

Every file in the folder is untrusted: it may come from a broken or hostile node. Each is read
through rack/folder.py (no symbolic links anywhere on the way, regular files only, size caps
on the open descriptor) and checked against its model, and nothing in a file names another
file to read: the files of a node are found by its rank, its node name (an identifier) and
the run id. A node whose files fail a check is marked failed, naming the file and the check;
the other nodes still count.

Each rank of the run becomes one node entry, in rank order:

| what the rank left | status |
|---|---|
| nothing | ``missing`` |
| an arrival at the barrier, no usable node folder | ``failed``: why the folder is unusable, else its reason |
| a node folder whose ``run.json`` is not final (killed, node down) | ``lost`` |
| a final ``run.json`` | its status (``completed``, ``failed``, ``cancelled``); ``completed`` needs a valid record |

Node folders that match no rank (another run's, a rank beyond the task count, a second
folder for one rank) are added after the ranks, marked ``failed``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rackscope import __version__
from rackscope.contract import IDENTIFIER_PATTERN
from rackscope.errors import ConfigError
from rackscope.fileio import is_temp_name, write_json
from rackscope.jsontypes import JsonDict
from rackscope.rack.answers import RunRecord, RunView
from rackscope.rack.barrier import ARRIVAL_NAME, BARRIER_DIR, DECISION_FILE, MAX_BARRIER_FILE_BYTES, Arrival, Decision
from rackscope.rack.bundle import CONFIG_FILE, NODES_DIR, RACK_FILE, node_file
from rackscope.rack.client import printable, record_problem
from rackscope.rack.folder import FolderError, MissingFile, list_dir, open_checked, read_model, read_object
from rackscope.rack.record import SCHEMA, NodeRun, assemble_record
from rackscope.rack.spec import DEFAULT_STRAGGLER_THRESHOLD, AnswerCaps
from rackscope.rack.task import NODE_FILE, RUN_FILE, TaskNode, record_name
from rackscope.runner.results.io import REQUESTS_SUFFIX
from rackscope.runner.results.record import RowsDigest, utc_iso

log = logging.getLogger(__name__)

# The caps of a rack run's answers apply to the same files here.
CAPS = AnswerCaps()
MAX_VIEW_BYTES = CAPS.answer_bytes
MAX_ROW_BYTES = 1 << 20  # one per-request row; a longer "line" would be held whole in memory by the pooling
_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)
_READ_CHUNK = 1 << 20


@dataclass
class _Found:
    """What the folder holds, before it is sorted into ranks."""

    decision: Decision | None = None
    arrivals: dict[int, Arrival] = field(default_factory=dict)
    nodes: dict[str, TaskNode] = field(default_factory=dict)  # node folder -> its node.json
    broken_nodes: dict[str, str] = field(default_factory=dict)  # node folder -> what is wrong
    ignored: list[str] = field(default_factory=list)  # what was left out, and why


def _note(n: NodeRun, message: str) -> None:
    n.error = printable(f"{n.error}; {message}" if n.error else message, 2000)


def _read_barrier(root: Path, found: _Found) -> None:
    try:
        found.decision = read_model(root, [BARRIER_DIR, DECISION_FILE], MAX_BARRIER_FILE_BYTES, Decision)
    except MissingFile:
        pass
    except FolderError as exc:
        found.ignored.append(str(exc))
    for name, _ in list_dir(root, [BARRIER_DIR]):
        m = ARRIVAL_NAME.match(name)
        if name == DECISION_FILE or is_temp_name(name):
            continue
        if m is None:
            found.ignored.append(f"{BARRIER_DIR}/{printable(name, 80)}: not a file a task writes")
            continue
        try:
            arrival = read_model(root, [BARRIER_DIR, name], MAX_BARRIER_FILE_BYTES, Arrival)
        except FolderError as exc:
            found.ignored.append(str(exc))
            continue
        if arrival.rank != int(m.group(1)):
            found.ignored.append(f"{BARRIER_DIR}/{name}: says rank {arrival.rank}")
            continue
        found.arrivals[arrival.rank] = arrival


def _read_nodes(root: Path, found: _Found) -> None:
    for name, is_dir in list_dir(root, [NODES_DIR]):
        if is_temp_name(name):
            continue
        if not _IDENTIFIER.match(name):
            found.ignored.append(f"{NODES_DIR}/{printable(name, 80)}: not a node name")
            continue
        if not is_dir:
            found.broken_nodes[name] = f"{NODES_DIR}/{name}: not a folder (links are not followed)"
            continue
        try:
            node = read_model(root, [NODES_DIR, name, NODE_FILE], MAX_VIEW_BYTES, TaskNode)
        except FolderError as exc:
            found.broken_nodes[name] = str(exc)
            continue
        if node.node != name:
            found.broken_nodes[name] = f"{node_file(name, NODE_FILE)}: says it is node {node.node}"
            continue
        found.nodes[name] = node


def _most_common(values: list[Any], what: str) -> Any:
    """The value most tasks agree on (ties: the largest)."""
    if not values:
        raise ConfigError(f"the folder does not say {what}")
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _rows_problem(root: Path, key: str, name: str, digest: RowsDigest | None) -> str | None:
    """Why the node's rows file cannot be used (None: it can): too large, a row too long, or
    not the rows its record names. ``MissingFile`` when there is none (a record without rows)."""
    parts = [NODES_DIR, key, name]
    shown = "/".join(parts)
    sha, rows, size, current = hashlib.sha256(), 0, 0, 0  # current: bytes of the row not yet ended
    try:
        with open_checked(root, parts, CAPS.requests_bytes) as handle:
            while chunk := handle.read(_READ_CHUNK):
                size += len(chunk)
                if size > CAPS.requests_bytes:
                    return f"{shown}: grew past {CAPS.requests_bytes:,} bytes while being read"
                sha.update(chunk)
                rows += chunk.count(b"\n")
                pieces = chunk.split(b"\n")
                if len(pieces) > 1:
                    ended = max(current + len(pieces[0]), max(map(len, pieces[1:-1]), default=0))
                    current = len(pieces[-1])
                else:
                    ended, current = 0, current + len(chunk)
                if max(ended, current) > MAX_ROW_BYTES:
                    return f"{shown}: a row longer than {MAX_ROW_BYTES:,} bytes"
    except MissingFile:
        raise
    except FolderError as exc:
        return str(exc)
    got = RowsDigest(rows, size, sha.hexdigest())
    if digest is not None and got != digest:
        return (f"{shown}: not the rows its record names ({got.rows} rows, {got.size_bytes} bytes; "
                f"the record names {digest.rows} rows, {digest.size_bytes} bytes)")
    return None


def _node_run(root: Path, rank: int | None, key: str, node: TaskNode, run_id: str, tasks: int) -> NodeRun:
    """One node's entry from its folder."""
    n = NodeRun(agent=_locator(rank), key=key, identity=node.model_dump(), status="failed")
    n.files["node"] = node_file(key, NODE_FILE)
    if node.run_id != run_id:
        _note(n, f"{node_file(key, NODE_FILE)}: of run {node.run_id}, not {run_id}")
        return n
    if node.tasks != tasks:
        _note(n, f"{node_file(key, NODE_FILE)}: counts {node.tasks} tasks, the run had {tasks}")
        return n
    try:
        n.view = read_object(root, [NODES_DIR, key, RUN_FILE], MAX_VIEW_BYTES, RunView)
    except FolderError as exc:
        _note(n, str(exc))
        return n
    n.files["run"] = node_file(key, RUN_FILE)
    if n.view["run_id"] != run_id:
        _note(n, f"{node_file(key, RUN_FILE)}: of run {printable(str(n.view['run_id']))}, not {run_id}")
        n.view = None
        return n
    status = str(n.view["status"])
    if status not in ("completed", "failed", "cancelled"):
        n.status = "lost"
        _note(n, f"the task left no final status (its run.json says {status}): it was killed, or its node went down")
        return n
    n.status = status
    if n.view.get("error"):
        _note(n, str(n.view["error"]))
    _read_record(root, n, run_id)
    return n


def _read_record(root: Path, n: NodeRun, run_id: str) -> None:
    """The node's run record and rows, as ``RackRun._collect`` takes them from an agent."""
    name = record_name(run_id)
    try:
        record = read_object(root, [NODES_DIR, n.key, name], CAPS.record_bytes, RunRecord)
    except MissingFile:
        record = None
        if n.status == "completed":
            _note(n, f"record not collected: {node_file(n.key, name)} is missing")
    except FolderError as exc:
        record = None
        _note(n, f"record not collected: {exc}")
    if record is not None:
        problem = record_problem(record, run_id, node_file(n.key, name))
        if problem is not None:
            _note(n, f"record not collected: {problem}")
        else:
            n.record = record
            n.files["record"] = node_file(n.key, name)
    if n.record is not None:
        rows = f"{run_id}{REQUESTS_SUFFIX}"
        try:
            problem = _rows_problem(root, n.key, rows, RowsDigest.from_record(n.record, name))
        except MissingFile:
            pass  # a record without per-request rows (trtllm-bench): nothing to pool
        else:
            if problem is None:
                n.files["requests"] = node_file(n.key, rows)
            else:
                _note(n, f"requests not collected: {problem}")
    if n.status == "completed" and n.record is None:
        n.status = "failed"
    summary = n.record.get("summary") if n.record is not None else None
    if isinstance(summary, dict) and summary.get("complete") is False and n.status == "completed":
        _note(n, f"run incomplete: {printable(str(summary.get('stop_reason', 'unknown reason')))}")


def _locator(rank: int | None) -> str:
    """How a node entry names the task it came from (the ``agent`` of a rack run's entry)."""
    return "task ?" if rank is None else f"task {rank}"


def _read_folder(root: Path) -> _Found:
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder")
    found = _Found()
    try:
        _read_barrier(root, found)
        _read_nodes(root, found)
    except FolderError as exc:
        raise ConfigError(f"{root}: {exc}") from exc
    if found.decision is None and not found.arrivals and not found.nodes:
        raise ConfigError(
            f"{root} holds no rack task files ({BARRIER_DIR}/, {NODES_DIR}/NODE/{NODE_FILE}): "
            "is it the --results folder of `rackscope rack task`?"
        )
    return found


def _extra_reason(node: TaskNode, tasks: int, run_id: str, by_rank: dict[int, str]) -> str:
    """Why a node folder with a valid node.json is not the folder of one of the run's ranks."""
    if node.run_id != run_id:
        return f"of run {node.run_id}, not {run_id}"
    if node.rank >= tasks:
        return f"rank {node.rank} is not one of the run's {tasks} tasks"
    return f"claims rank {node.rank}, which {NODES_DIR}/{by_rank[node.rank]} also claims"


def _entries(root: Path, found: _Found, tasks: int, run_id: str) -> list[NodeRun]:
    """One entry per rank, in rank order, then the folders that belong to no rank."""
    by_rank: dict[int, str] = {}
    extras: list[NodeRun] = []
    for key, node in sorted(found.nodes.items(), key=lambda item: (item[1].rank, item[0])):
        if node.rank < tasks and node.rank not in by_rank and node.run_id == run_id:
            by_rank[node.rank] = key
            continue
        why = _extra_reason(node, tasks, run_id, by_rank)
        extra = _node_run(root, node.rank, key, node, run_id, tasks)
        extra.status = "failed"
        if why not in (extra.error or ""):
            _note(extra, why)
        extras.append(extra)
    broken = dict(found.broken_nodes)
    nodes: list[NodeRun] = []
    for rank in range(tasks):
        arrival = found.arrivals.get(rank)
        if arrival is not None and arrival.run_id != run_id:
            arrival = None
        if rank in by_rank:
            n = _node_run(root, rank, by_rank[rank], found.nodes[by_rank[rank]], run_id, tasks)
        elif arrival is not None:
            # No usable folder: the name comes from the arrival, the reason from the folder if
            # there is one, else from the arrival.
            n = NodeRun(agent=_locator(rank), status="failed", identity={"node": arrival.node, "rack": arrival.rack})
            if arrival.node in broken:
                n.key = arrival.node
                _note(n, broken.pop(arrival.node))
            else:
                _note(n, arrival.error or "arrived at the start barrier but left no node files")
        else:
            n = NodeRun(agent=_locator(rank), status="missing")
            _note(n, f"task rank {rank} of {tasks} left no files: it never started, or stopped before it "
                     "claimed its node")
        nodes.append(n)
    for key, problem in sorted(broken.items()):
        n = NodeRun(agent=_locator(None), key=key, status="failed")
        _note(n, problem)
        extras.append(n)
    return nodes + extras


def collect(root: Path, *, threshold: float = DEFAULT_STRAGGLER_THRESHOLD) -> JsonDict:
    """Read the tasks' files in ``root``, write ``config.json`` and ``rack.json`` there, and
    return the rack record. ``ConfigError`` when ``root`` holds no rack run."""
    if not 0 < threshold <= 1:
        raise ConfigError("--straggler-threshold must be more than 0 and at most 1")
    found = _read_folder(root)
    decision = found.decision
    # The start decision is what every task followed; without one, what most tasks say.
    tasks: int = decision.tasks if decision is not None else _most_common(
        [a.tasks for a in found.arrivals.values()] + [t.tasks for t in found.nodes.values()], "how many tasks")
    run_id: str = decision.run_id if decision is not None else _most_common(
        [a.run_id for a in found.arrivals.values()] + [t.run_id for t in found.nodes.values()], "its run id")
    nodes = _entries(root, found, tasks, run_id)
    if decision is not None and not decision.go:
        state, error = "failed", f"the run was called off at the start barrier: {decision.reason}"
    else:
        state, error = "finished", None
    run = _run_settings(decision, found, run_id)
    created = [float(n.view["created_at"]) for n in nodes if n.view is not None]
    ended = [float(n.view["ended_at"]) for n in nodes if n.view is not None and n.view.get("ended_at") is not None]
    record = assemble_record(
        nodes,
        rack_run_id=run_id,
        run=run,
        agents=[n.agent for n in nodes],
        threshold=threshold,
        bundle_root=root,
        state=state,
        error=error,
        created_at=min(created) if created else None,
        start_at=decision.start_at if decision is not None else None,
        lead_time_s=decision.lead_time_s if decision is not None else None,
        ended_at=max(ended) if ended else None,
    )
    for problem in found.ignored:
        log.warning("left out: %s", problem)
    write_json(root / CONFIG_FILE, {
        "schema": SCHEMA,
        "rack_run_id": run_id,
        "collected_from": "rack tasks",
        "tasks": tasks,
        "run": run,
        "barrier": None if decision is None else {
            "go": decision.go, "reason": decision.reason, "decided_by": decision.decided_by,
            "decided_at": decision.decided_at, "start_at": decision.start_at, "lead_time_s": decision.lead_time_s,
        },
        "straggler_threshold": threshold,
        "ignored": found.ignored,
        "collected_at": utc_iso(datetime.now(UTC)),
        "rackscope_version": __version__,
    })
    write_json(root / RACK_FILE, record)  # last: a rack.json is there only with everything it names
    return record


def _run_settings(decision: Decision | None, found: _Found, run_id: str) -> JsonDict:
    """The settings every node ran, as the start decision (else the arrivals) recorded them;
    only known settings with valid values are kept (they are shown and compared)."""
    from rackscope.runner.config import SETTINGS, check

    source = decision.run if decision is not None and decision.run is not None else next(
        (a.run for _, a in sorted(found.arrivals.items()) if a.run is not None and a.run_id == run_id), None)
    out: JsonDict = {}
    for name, value in (source or {}).items():
        setting = SETTINGS.get(name)
        if setting is None or not setting.rack:
            found.ignored.append(f"run setting {printable(name, 60)}: not a setting a rack run shares")
            continue
        if value is None:
            out[name] = None
            continue
        try:
            check(setting, value)
        except ConfigError as exc:
            found.ignored.append(f"run setting {name}: {exc}")
            continue
        out[name] = value
    return out


__all__ = ["collect"]
