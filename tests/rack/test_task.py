"""`rackscope rack task` as a process, without a scheduler: a signal at the barrier, and a
results folder that already holds a run."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from tests.helpers import stop_process, wait_for
from tests.rack.tasks import RUN_ID, run_tasks, task_argv


def test_sigterm_at_the_barrier_calls_the_run_off_and_cancels_the_task(tmp_path: Path) -> None:
    results = tmp_path / "res"
    proc = subprocess.Popen(task_argv(results, 0, 2, "--barrier-timeout", "60"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # A task installs its signal handlers before it arrives.
        wait_for("rank 0 at the barrier", (results / "barrier" / "0.json").exists, timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err
    decision = json.loads((results / "barrier" / "start.json").read_text())
    assert decision["go"] is False
    assert decision["reason"] == "rank 0 of 2 (n01) was stopped by SIGTERM before the start"
    view = json.loads((results / "nodes" / "n01" / "run.json").read_text())
    assert (view["status"], view["started_at"]) == ("cancelled", None)
    assert "stopped by SIGTERM" in view["error"]
    assert not (results / "nodes" / "n01" / f"{RUN_ID}.json").exists()


def test_a_folder_that_holds_a_run_is_not_written_over(tmp_path: Path) -> None:
    results = tmp_path / "res"
    (first,) = run_tasks(results, 1)
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    (second,) = run_tasks(results, 1)
    assert second.returncode == 2
    assert "res/nodes/n01 exists: another task is node n01" in second.stderr
    assert "give each run its own --results" in second.stderr
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before
