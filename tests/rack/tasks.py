"""Rack task folders for the tests: real `rackscope rack task` processes, one per rank, on
this machine (without a scheduler: ranks, node names and the run id as flags)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.helpers import rackscope_command, stop_process

# 2 s measured on virtual time: moments of wall time, dozens of requests per node.
FAST_WORKLOAD = ("--engine", "sim", "--gpu-model", "h100", "--gpus", "1", "--virtual-clock", "--scenario",
                 "concurrency", "--concurrency", "8", "--duration", "2", "--warmup", "0", "--input-len", "32",
                 "--output-len", "16")
RUN_ID = "t1"


def node_name(rank: int) -> str:
    return f"n{rank + 1:02d}"


def task_argv(results: Path, rank: int, tasks: int, *extra: str) -> list[str]:
    return [*rackscope_command("rack", "task"), "--results", str(results), "--rank", str(rank), "--tasks", str(tasks),
            "--node", node_name(rank), "--rack", "r1", "--run-id", RUN_ID, "--start-lead", "0.2", *FAST_WORKLOAD,
            *extra]


def run_tasks(results: Path, tasks: int, extra: Sequence[Sequence[str]] = (), timeout_s: float = 60.0
              ) -> list[subprocess.CompletedProcess[str]]:
    """Run ``tasks`` tasks at once (rank i gets ``extra[i]`` appended) and wait for them all."""
    procs = [subprocess.Popen(task_argv(results, rank, tasks, *(extra[rank] if rank < len(extra) else ())),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(tasks)]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout_s)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            stop_process(proc)
    return done


def finished_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-task run's results folder, for tests to copy (never to change)."""
    folder = tmp_path_factory.mktemp("tasks") / "res"
    done = run_tasks(folder, 2)
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
    return folder
