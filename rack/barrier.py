"""The start barrier of a rack run's tasks: files in the shared results folder.

Every task prepares its engine, then arrives (``barrier/RANK.json``: who it is, when, and the
run settings it will use) and watches the folder. The start is decided once, for all, by the
first task that can decide, in ``barrier/start.json``:

- **go**, when every rank has arrived ready with the same run, task count and settings:
  ``start_at`` = the deciding task's clock + the lead time. Each task waits until then, so
  the nodes start within a few milliseconds of each other if their clocks agree (NTP), as in
  ``rackscope rack run``.
- **off**, when a task reports that it failed before the start (``ready: false``), two tasks
  disagree, a task is stopped by a signal, or the barrier times out (measured from each
  task's own arrival) with ranks missing. Every task then ends without running anything.

Either every task starts or none does: a task that arrives after the decision finds it and
follows it, so a late task never runs alone. ``start.json`` is published with ``link()``,
which fails when the name exists (on NFS too), so two tasks deciding at once cannot both
win, and a reader sees a whole file or none (it is written to a temporary file first, as
rackscope.fileio writes). Arrival files are published the same way: a second task with the
same rank, or a folder that holds an earlier run, is refused instead of overwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from rackscope.contract import IDENTIFIER_PATTERN
from rackscope.errors import ConfigError, ResultError
from rackscope.fileio import dumps, fsync_dir, temp_path
from rackscope.jsontypes import JsonDict
from rackscope.rack.answers import Label, UnixTime
from rackscope.rack.client import printable
from rackscope.rack.folder import FolderError, MissingFile, list_dir, read_model
from rackscope.rack.identity import MAX_TASKS, TaskIdentity
from rackscope.runner.results.record import utc_iso

log = logging.getLogger(__name__)

BARRIER_DIR = "barrier"
DECISION_FILE = "start.json"
DEFAULT_TIMEOUT_S = 600.0  # engines that load a 70B checkpoint take minutes before they arrive
DEFAULT_LEAD_S = 1.0  # every task must see the decision before start_at: a few polls and the file system
MAX_LEAD_S = 3600.0
POLL_S = 0.05  # how often a waiting task looks; it sets how soon a decision is seen, not the spread
MAX_BARRIER_FILE_BYTES = 256 * 1024
MAX_REASON_CHARS = 2000
ARRIVAL_NAME = re.compile(r"^(0|[1-9][0-9]{0,8})\.json$")  # barrier/RANK.json
_sequence = itertools.count()

Identifier = Annotated[str, Field(pattern=IDENTIFIER_PATTERN)]
Rank = Annotated[int, Field(ge=0, lt=MAX_TASKS)]
Tasks = Annotated[int, Field(ge=1, le=MAX_TASKS)]
Reason = Annotated[str, Field(max_length=MAX_REASON_CHARS)]


class _File(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class Arrival(_File):
    """``barrier/RANK.json``: a task at the barrier, ready (its engine started) or not."""

    rank: Rank
    tasks: Tasks
    run_id: Identifier
    node: Identifier
    rack: Identifier
    host: Label
    pid: Annotated[int, Field(ge=0)]
    at: UnixTime
    ready: bool
    error: Reason | None = None
    run: dict[str, Any] | None = None  # the settings every node must share (rack_settings)


class Decision(_File):
    """``barrier/start.json``: go at ``start_at``, or off for ``reason``."""

    go: bool
    run_id: Identifier
    tasks: Tasks
    decided_by: Rank
    decided_at: UnixTime
    start_at: UnixTime | None = None
    lead_time_s: Annotated[float, Field(ge=0, le=MAX_LEAD_S, allow_inf_nan=False)] | None = None
    reason: Reason | None = None
    run: dict[str, Any] | None = None
    nodes: Annotated[list[Identifier], Field(max_length=MAX_TASKS)] | None = None  # by rank, when go


class BarrierOff(ResultError):
    """The rack run was called off at the barrier; every task ends without running."""


def publish_once(path: Path, obj: Any) -> bool:
    """Write ``obj`` as JSON to ``path`` unless ``path`` exists; whether this call wrote it.

    The bytes go to a temporary file first, fsynced, then ``link()`` gives it the name, which
    fails when the name is taken: no reader sees half a file and no writer overwrites another."""
    data = dumps(obj)
    while True:
        tmp = temp_path(path, os.getpid(), next(_sequence))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise ResultError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)
                won = True
            except FileExistsError:
                # Over NFS a link whose reply was lost is retried and then finds its own name;
                # the temporary file's link count says whether the first attempt succeeded.
                won = os.stat(tmp).st_nlink > 1
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    except OSError as exc:
        raise ResultError(f"cannot write {path}: {exc.strerror or exc}") from exc
    fsync_dir(path.parent)
    return won


def _differences(mine: JsonDict, theirs: JsonDict) -> str:
    keys = sorted(set(mine) | set(theirs))
    shown = [f"{k} {theirs.get(k)!r} instead of {mine.get(k)!r}" for k in keys if mine.get(k) != theirs.get(k)]
    return printable(", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else ""), 300)


class Barrier:
    """The start barrier as one task sees it (see the module's description)."""

    def __init__(
        self,
        root: Path,
        me: TaskIdentity,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        lead_s: float = DEFAULT_LEAD_S,
        poll_s: float = POLL_S,
    ) -> None:
        self.root = Path(root)
        self.dir = self.root / BARRIER_DIR
        self.me = me
        self.timeout_s = timeout_s
        self.lead_s = lead_s
        self.poll_s = poll_s
        self.arrived = False
        self.run: JsonDict | None = None
        self._seen: dict[int, Arrival] = {}
        self._bad: dict[str, str] = {}  # file name -> what is wrong with it

    # --- arriving ----------------------------------------------------------------------------
    def _arrival(self, *, ready: bool, error: str | None = None) -> JsonDict:
        me = self.me
        return Arrival(
            rank=me.rank, tasks=me.tasks, run_id=me.run_id, node=me.node, rack=me.rack, host=printable(me.host, 200),
            pid=os.getpid(), at=time.time(), ready=ready,
            error=None if error is None else printable(error, MAX_REASON_CHARS), run=self.run,
        ).model_dump()

    def _check_folder(self) -> None:
        """Refuse a folder whose barrier belongs to another run (one folder per run)."""
        for name, _ in list_dir(self.root, [BARRIER_DIR]):
            if ARRIVAL_NAME.match(name):
                other = self._read_arrival(name)
                if other is not None and other.run_id != self.me.run_id:
                    raise ConfigError(
                        f"{self.root} holds rack run {other.run_id}, and this task's run is {self.me.run_id}: "
                        "give each run its own --results folder"
                    )
                return

    def arrive(self, run: JsonDict) -> None:
        """Ready: the engine has started. ``run`` is what every task must agree on."""
        self.run = run
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.dir}: {exc.strerror or exc}") from exc
        self._check_folder()
        if not publish_once(self.dir / f"{self.me.rank}.json", self._arrival(ready=True)):
            raise ConfigError(self._taken())
        self.arrived = True
        log.info("%s: at the start barrier, waiting for %d task(s)", self.me.describe(), self.me.tasks)

    def _taken(self) -> str:
        other = self._read_arrival(f"{self.me.rank}.json")
        who = f" (node {other.node} on {other.host}, pid {other.pid})" if other is not None else ""
        return (
            f"rank {self.me.rank} has already arrived at the barrier in {self.root}{who}: two tasks have the "
            "same rank, or the folder holds an earlier run; give each run its own --results folder"
        )

    def give_up(self, reason: str) -> None:
        """This task cannot start (it failed before the start, or was stopped): say so at the
        barrier, so the others end now instead of at the timeout. Never raises."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._check_folder()
            if not self.arrived:
                publish_once(self.dir / f"{self.me.rank}.json", self._arrival(ready=False, error=reason))
            self._decide(go=False, reason=f"{self.me.describe()} cannot start: {reason}")
        except (ConfigError, ResultError) as exc:
            log.warning("%s: could not tell the other tasks that it gives up: %s", self.me.describe(), exc)

    # --- reading the others ------------------------------------------------------------------
    def _read_arrival(self, name: str) -> Arrival | None:
        try:
            return read_model(self.root, [BARRIER_DIR, name], MAX_BARRIER_FILE_BYTES, Arrival)
        except FolderError as exc:
            self._bad[name] = str(exc)
            return None

    def _look(self) -> None:
        """Read the arrivals not read yet (published files never change)."""
        for name, _ in list_dir(self.root, [BARRIER_DIR]):
            m = ARRIVAL_NAME.match(name)
            if m is None or int(m.group(1)) in self._seen or name in self._bad:
                continue
            arrival = self._read_arrival(name)
            if arrival is not None:
                if arrival.rank != int(m.group(1)):
                    self._bad[name] = f"{BARRIER_DIR}/{name}: says rank {arrival.rank}"
                else:
                    self._seen[arrival.rank] = arrival

    def _objection(self) -> str | None:
        """Why the run cannot start, from what has arrived so far; None if nothing is wrong yet."""
        me = self.me
        if self._bad:
            return next(iter(self._bad.values()))
        nodes: dict[str, int] = {}
        for rank, a in sorted(self._seen.items()):
            who = f"rank {rank} ({a.node})"
            if not a.ready:
                return f"{who} cannot start: {a.error or 'no reason given'}"
            if a.run_id != me.run_id:
                return f"{who} is of run {a.run_id}, rank {me.rank}'s is {me.run_id}"
            if a.tasks != me.tasks or rank >= me.tasks:
                return f"{who} counts {a.tasks} tasks, rank {me.rank} counts {me.tasks}"
            if a.run != self.run:
                return f"{who} runs other settings than rank {me.rank}: {_differences(self.run or {}, a.run or {})}"
            if a.node in nodes:
                return (f"ranks {nodes[a.node]} and {rank} both are node {a.node} "
                        "(several tasks per node: --node-from name-rank)")
            nodes[a.node] = rank
        return None

    def _read_decision(self) -> Decision | None:
        try:
            decision = read_model(self.root, [BARRIER_DIR, DECISION_FILE], MAX_BARRIER_FILE_BYTES, Decision)
        except MissingFile:
            return None
        except FolderError as exc:
            # Every task reads the same file, so every task calls the run off alike.
            return Decision(go=False, run_id=self.me.run_id, tasks=self.me.tasks, decided_by=self.me.rank,
                            decided_at=time.time(), reason=f"the start decision is unreadable: {exc}")
        if decision.run_id != self.me.run_id or decision.tasks != self.me.tasks:
            raise ConfigError(
                f"{self.dir / DECISION_FILE} decides run {decision.run_id} of {decision.tasks} tasks, and this task "
                f"is in run {self.me.run_id} of {self.me.tasks}: give each run its own --results folder"
            )
        return decision

    def _decide(self, *, go: bool, reason: str | None = None) -> Decision:
        """Publish this task's decision unless another's is there first; the decision that holds."""
        me = self.me
        now = time.time()
        decision = Decision(
            go=go, run_id=me.run_id, tasks=me.tasks, decided_by=me.rank, decided_at=now,
            start_at=now + self.lead_s if go else None, lead_time_s=self.lead_s if go else None,
            reason=None if reason is None else printable(reason, MAX_REASON_CHARS), run=self.run,
            nodes=[self._seen[r].node for r in range(me.tasks)] if go else None,
        )
        if publish_once(self.dir / DECISION_FILE, decision.model_dump()):
            return decision
        theirs = self._read_decision()
        if theirs is None:  # published and then removed: nothing can be trusted here
            raise ResultError(f"{self.dir / DECISION_FILE} vanished after it was written")
        return theirs

    # --- waiting -----------------------------------------------------------------------------
    def step(self, deadline: float, stopped: str | None = None) -> Decision | None:
        """One look at the folder: the decision once there is one (deciding if this task can)."""
        decision = self._read_decision()
        if decision is not None:
            return decision
        if stopped is not None:
            return self._decide(go=False, reason=f"{self.me.describe()} was stopped by {stopped} before the start")
        self._look()
        objection = self._objection()
        if objection is not None:
            return self._decide(go=False, reason=objection)
        if len(self._seen) == self.me.tasks:
            return self._decide(go=True)
        if time.monotonic() > deadline:
            missing = [r for r in range(self.me.tasks) if r not in self._seen]
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            return self._decide(
                go=False,
                reason=f"the start barrier timed out after {self.timeout_s:g} s: rank(s) {shown} did not arrive "
                f"({len(missing)} of {self.me.tasks} missing)",
            )
        return None

    async def wait(self, stopped: Callable[[], str | None] = lambda: None) -> Decision:
        """Wait for the decision (``stopped`` names a signal that stopped this task, if one did)
        and, when it is go, until its start time. ``BarrierOff`` when the run is called off."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            # Other tasks decide too, in other processes: there is no event to wait on, only files.
            decision = self.step(deadline, stopped())
            if decision is not None:
                break
            await asyncio.sleep(self.poll_s)
        if not decision.go:
            raise BarrierOff(f"the rack run was called off at the start barrier: {decision.reason}")
        assert decision.start_at is not None
        delay = decision.start_at - time.time()
        log.info("%s: all %d tasks ready; start at %s (in %.3f s)", self.me.describe(), self.me.tasks,
                 utc_iso(datetime.fromtimestamp(decision.start_at, UTC)), delay)
        if delay < 0:
            log.warning("%s: saw the start decision %.3f s after the common start: raise --start-lead",
                        self.me.describe(), -delay)
        while (delay := decision.start_at - time.time()) > 0:
            if (signal_name := stopped()) is not None:
                raise BarrierOff(f"{self.me.describe()} was stopped by {signal_name} before the start")
            await asyncio.sleep(min(delay, self.poll_s))
        return decision


__all__ = [
    "ARRIVAL_NAME",
    "BARRIER_DIR",
    "DECISION_FILE",
    "DEFAULT_LEAD_S",
    "DEFAULT_TIMEOUT_S",
    "Arrival",
    "Barrier",
    "BarrierOff",
    "Decision",
    "publish_once",
]
