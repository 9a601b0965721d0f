"""The rack tasks' start barrier: one decision for all (go at a common start, or off with a
reason), whoever decides; a missing task times out, a task that cannot start or is stopped
calls the run off at once, and a late task follows the decision instead of running alone.

Several tasks are several ``Barrier`` objects on one folder in one event loop: the barrier
shares nothing but the files, so this is what separate processes on separate nodes see."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from rackscope.errors import ConfigError
from rackscope.fileio import is_temp_name
from rackscope.rack.barrier import Barrier, BarrierOff, Decision, publish_once
from rackscope.rack.identity import TaskIdentity

SETTINGS = {"engine": "sim", "duration_s": 5.0}


def identity(rank: int, tasks: int = 3, run_id: str = "run1", node: str | None = None) -> TaskIdentity:
    return TaskIdentity(rank=rank, tasks=tasks, node=node or f"n{rank}", rack="r1", run_id=run_id,
                        scheduler="none", host="host")


def barrier(root: Path, rank: int, tasks: int = 3, *, timeout_s: float = 10.0, lead_s: float = 0.3,
            **kw: str) -> Barrier:
    return Barrier(root, identity(rank, tasks, **kw), timeout_s=timeout_s, lead_s=lead_s, poll_s=0.01)


async def arrive_and_wait(b: Barrier, settings: dict[str, object] | None = None) -> tuple[Decision, float]:
    b.arrive(dict(SETTINGS if settings is None else settings))
    decision = await b.wait()
    return decision, time.time()


def decision_file(root: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / "barrier" / "start.json").read_text())
    return data


def test_publish_once_writes_once_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "start.json"
    assert publish_once(target, {"who": 1}) is True
    assert publish_once(target, {"who": 2}) is False
    assert json.loads(target.read_text()) == {"who": 1}
    assert os.listdir(tmp_path) == ["start.json"]


async def test_every_task_gets_the_same_start_and_none_starts_before_it(tmp_path: Path) -> None:
    barriers = [barrier(tmp_path, r) for r in range(3)]

    async def late(b: Barrier, delay: float) -> tuple[Decision, float]:
        await asyncio.sleep(delay)  # tasks arrive as their engines come up
        return await arrive_and_wait(b)

    results = await asyncio.gather(late(barriers[0], 0.0), late(barriers[1], 0.15), late(barriers[2], 0.3))
    decision = results[0][0]
    assert all(d == decision for d, _ in results)
    assert decision.go is True and decision.nodes == ["n0", "n1", "n2"] and decision.run == SETTINGS
    # The last arrival can decide only once it is there: start = its decision + the lead.
    assert decision.lead_time_s == 0.3 and decision.start_at == pytest.approx(decision.decided_at + 0.3)
    released = [t for _, t in results]
    assert decision.start_at is not None and all(t >= decision.start_at for t in released)
    assert max(released) - min(released) < 0.05
    assert decision_file(tmp_path)["start_at"] == decision.start_at
    assert not [p for p in (tmp_path / "barrier").iterdir() if is_temp_name(p.name)]


async def test_a_missing_task_times_out_and_a_late_one_follows_the_decision(tmp_path: Path) -> None:
    waiting = [barrier(tmp_path, r, timeout_s=0.3) for r in (0, 1)]
    started = time.monotonic()
    results = await asyncio.gather(*(arrive_and_wait(b) for b in waiting), return_exceptions=True)
    assert 0.3 <= time.monotonic() - started < 5
    reason = "the start barrier timed out after 0.3 s: rank(s) 2 did not arrive (1 of 3 missing)"
    assert all(isinstance(r, BarrierOff) and reason in str(r) for r in results), results
    assert decision_file(tmp_path)["go"] is False
    # Rank 2 turns up after all: it must not start alone.
    with pytest.raises(BarrierOff, match="rank.s. 2 did not arrive"):
        await arrive_and_wait(barrier(tmp_path, 2))


async def test_a_task_that_cannot_start_calls_the_run_off_at_once(tmp_path: Path) -> None:
    waiting = [barrier(tmp_path, r, timeout_s=60) for r in (0, 1)]
    tasks = [asyncio.create_task(arrive_and_wait(b)) for b in waiting]
    await asyncio.sleep(0.05)
    barrier(tmp_path, 2).give_up("cannot read dataset prompts.jsonl: No such file or directory")
    started = time.monotonic()
    for task in tasks:
        with pytest.raises(BarrierOff, match=r"rank 2 of 3 \(n2\) cannot start: cannot read dataset prompts.jsonl"):
            await task
    assert time.monotonic() - started < 2
    arrival = json.loads((tmp_path / "barrier" / "2.json").read_text())
    assert arrival["ready"] is False and "prompts.jsonl" in arrival["error"]


async def test_a_stopped_task_calls_the_run_off(tmp_path: Path) -> None:
    others = [asyncio.create_task(arrive_and_wait(barrier(tmp_path, r, timeout_s=60))) for r in (0, 1)]
    stopped = barrier(tmp_path, 2, timeout_s=60)
    stopped.arrive(dict(SETTINGS))
    # Rank 2's signal arrives before everyone has decided: the whole run is off, not just rank 2.
    with pytest.raises(BarrierOff, match="stopped by SIGTERM before the start"):
        await stopped.wait(lambda: "SIGTERM")
    for task in others:
        with pytest.raises(BarrierOff, match=r"rank 2 of 3 \(n2\) was stopped by SIGTERM"):
            await task


async def test_tasks_with_other_settings_call_the_run_off(tmp_path: Path) -> None:
    results = await asyncio.gather(
        arrive_and_wait(barrier(tmp_path, 0, tasks=2)),
        arrive_and_wait(barrier(tmp_path, 1, tasks=2), {"engine": "sim", "duration_s": 10.0}),
        return_exceptions=True,
    )
    assert all(isinstance(r, BarrierOff) for r in results)
    assert "runs other settings than rank" in str(decision_file(tmp_path)["reason"])
    assert "duration_s" in str(decision_file(tmp_path)["reason"])


async def test_two_tasks_calling_themselves_the_same_node_call_the_run_off(tmp_path: Path) -> None:
    results = await asyncio.gather(
        arrive_and_wait(barrier(tmp_path, 0, tasks=2, node="gpu01")),
        arrive_and_wait(barrier(tmp_path, 1, tasks=2, node="gpu01")),
        return_exceptions=True,
    )
    assert all(isinstance(r, BarrierOff) and "ranks 0 and 1 both are node gpu01" in str(r)
               and "--node-from name-rank" in str(r) for r in results), results


async def test_a_garbage_arrival_calls_the_run_off(tmp_path: Path) -> None:
    (tmp_path / "barrier").mkdir()
    (tmp_path / "barrier" / "1.json").write_text('{"rank": "one"}')
    with pytest.raises(BarrierOff, match=r"barrier/1.json: rank: Input should be a valid integer"):
        await arrive_and_wait(barrier(tmp_path, 0, tasks=2))


async def test_a_garbage_decision_is_followed_as_off_by_everyone(tmp_path: Path) -> None:
    (tmp_path / "barrier").mkdir()
    (tmp_path / "barrier" / "start.json").write_text("go!")
    with pytest.raises(BarrierOff, match="the start decision is unreadable: barrier/start.json: not valid JSON"):
        await arrive_and_wait(barrier(tmp_path, 0, tasks=2))


def test_a_rank_arrives_once(tmp_path: Path) -> None:
    barrier(tmp_path, 0).arrive(dict(SETTINGS))
    with pytest.raises(ConfigError, match=r"rank 0 has already arrived at the barrier in .* \(node n0 on host"):
        barrier(tmp_path, 0).arrive(dict(SETTINGS))


def test_a_folder_of_another_run_is_refused(tmp_path: Path) -> None:
    barrier(tmp_path, 0, run_id="first").arrive(dict(SETTINGS))
    with pytest.raises(ConfigError, match=r"holds rack run first, and this task's run is second: give each run"):
        barrier(tmp_path, 1, run_id="second").arrive(dict(SETTINGS))
    # Giving up in a folder of another run leaves that run alone.
    barrier(tmp_path, 1, run_id="second").give_up("bad flags")
    assert sorted(os.listdir(tmp_path / "barrier")) == ["0.json"]
