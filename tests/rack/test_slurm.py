"""Rack runs under a real Slurm: `srun -n 3 rackscope rack task ...` on a one-machine cluster
(tests/rack/slurm_cluster.py), then `rackscope rack collect`, checked through the bundle.

The three tasks share the one node, so they run with `--node-from name-rank` (sn01-0, sn01-1,
sn01-2); everything else of their identity comes from Slurm's variables."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from rackscope.fileio import is_temp_name
from tests.helpers import rackscope_command
from tests.rack.slurm_cluster import NODE, SlurmCluster

pytestmark = pytest.mark.slow

# A short simulated run: 1 s measured, short requests so that each node finishes dozens.
WORKLOAD = ("--engine", "sim", "--gpu-model", "h100", "--gpus", "1", "--scenario", "concurrency",
            "--concurrency", "8", "--duration", "1", "--warmup", "0", "--input-len", "32", "--output-len", "16")
TASK = (*rackscope_command("rack", "task"), "--results", "res", "--rack", "r1", "--node-from", "name-rank")
NODES = [f"{NODE}-{rank}" for rank in range(3)]


def _collect(folder: Path) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run([*rackscope_command("rack", "collect"), str(folder), "--json"], capture_output=True,
                          text=True, timeout=60, check=False)
    return done.returncode, json.loads(done.stdout) if done.stdout else {}, done.stderr


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if is_temp_name(p.name)]


def _explain(slurm: SlurmCluster, done: subprocess.CompletedProcess[str]) -> str:
    return (f"rc {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}\n"
            f"{slurm.diagnostics()}")


def test_srun_tasks_start_together_and_collect_into_a_rack_record(slurm: SlurmCluster, tmp_path: Path) -> None:
    done = slurm.srun(*TASK, *WORKLOAD, tasks=3)
    assert done.returncode == 0, _explain(slurm, done)

    rc, record, err = _collect(tmp_path / "res")
    assert rc == 0, err
    assert record == json.loads((tmp_path / "res" / "rack.json").read_text())
    assert re.fullmatch(r"slurm-[0-9]+-0", record["rack_run_id"]), record["rack_run_id"]
    run_id = record["rack_run_id"]
    assert record["schema"] == "rackscope.rack/1"
    assert record["state"] == "finished"
    assert record["rack"] == "r1"
    assert [n["node"] for n in record["nodes"]] == NODES
    assert [n["status"] for n in record["nodes"]] == ["completed"] * 3
    s = record["summary"]
    assert s["complete"] is True
    assert (s["nodes"], s["nodes_completed"], s["nodes_failed"], s["gpus"]) == (3, 3, 0, 3)

    # The rack totals are the sums of the node records the tasks wrote.
    summaries = [json.loads((tmp_path / "res" / "nodes" / node / f"{run_id}.json").read_text())["summary"]
                 for node in NODES]
    assert all(x["output_tokens"] > 0 and x["complete"] for x in summaries)
    assert s["output_tokens"] == sum(x["output_tokens"] for x in summaries)
    assert math.isclose(s["output_tokens_per_s"], sum(x["output_tokens_per_s"] for x in summaries))
    assert s["requests_completed"] == sum(x["requests_completed"] for x in summaries)
    assert math.isclose(s["energy_j"], sum(x["energy_j"] for x in summaries))
    rows = sum(len((tmp_path / "res" / "nodes" / node / f"{run_id}.requests.jsonl").read_text().splitlines())
               for node in NODES)
    assert rows == s["requests_completed"] + sum(x["requests_cancelled"] for x in summaries)
    assert s["ttft_s"]["count"] == s["requests_completed"]  # latencies pool the finished requests of every node

    # One common start and no node before it: a few milliseconds apart here (the bound leaves room
    # for a machine whose cores other work shares).
    decision = json.loads((tmp_path / "res" / "barrier" / "start.json").read_text())
    assert decision["go"] is True and decision["nodes"] == NODES
    assert record["start_at"] == decision["start_at"]
    starts = [n["started_at"] for n in record["nodes"]]
    assert min(starts) >= decision["start_at"]
    assert s["start_spread_s"] == max(starts) - min(starts) < 0.1

    # Each node's identity came from Slurm.
    for rank, node in enumerate(NODES):
        identity = json.loads((tmp_path / "res" / "nodes" / node / "node.json").read_text())
        assert (identity["rank"], identity["tasks"], identity["scheduler"]) == (rank, 3, "slurm")
        assert identity["scheduler_env"]["SLURM_PROCID"] == str(rank)
        assert identity["sources"] == {"rank": "SLURM_PROCID", "tasks": "SLURM_NTASKS", "node": "SLURMD_NODENAME",
                                       "rack": "--rack", "run_id": "SLURM_JOB_ID, SLURM_STEP_ID"}
    assert _temp_files(tmp_path / "res") == []


def test_a_task_that_never_arrives_calls_the_run_off_at_the_timeout(slurm: SlurmCluster, tmp_path: Path) -> None:
    # Rank 2 dies before it starts rackscope at all; the others wait 3 s at the barrier.
    script = 'if [ "$SLURM_PROCID" = 2 ]; then exit 3; fi; exec "$@"'
    started = time.monotonic()
    done = slurm.srun("bash", "-c", script, "task", *TASK, "--barrier-timeout", "3", *WORKLOAD, tasks=3)
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert done.stderr.count("timed out after 3 s: rank(s) 2 did not arrive (1 of 3 missing)") == 2, done.stderr
    assert 3 <= elapsed < 30

    rc, record, err = _collect(tmp_path / "res")
    assert rc == 1, err
    assert record["state"] == "failed"
    assert "did not arrive" in record["error"]
    assert [(n["node"], n["status"]) for n in record["nodes"]] == [
        (NODES[0], "failed"), (NODES[1], "failed"), ("task 2", "missing")]
    assert "left no files" in record["nodes"][2]["error"]
    assert record["summary"]["nodes_completed"] == 0 and record["summary"]["complete"] is False
    # Nothing ran, so nothing but identities and final views was written; nothing half-written.
    for node in NODES[:2]:
        folder = tmp_path / "res" / "nodes" / node
        assert sorted(p.name for p in folder.iterdir()) == ["node.json", "run.json"]
        view = json.loads((folder / "run.json").read_text())
        assert view["status"] == "failed" and view["started_at"] is None
        assert "rank(s) 2 did not arrive" in view["error"]
    assert _temp_files(tmp_path / "res") == []


def test_a_task_that_fails_before_the_start_ends_the_others_at_once(slurm: SlurmCluster, tmp_path: Path) -> None:
    # Rank 1 names a dataset that is not there: it fails before its engine starts and says so
    # at the barrier, so the others do not wait out their 60 s.
    script = 'if [ "$SLURM_PROCID" = 1 ]; then exec "$@" --dataset missing.jsonl; fi; exec "$@"'
    started = time.monotonic()
    done = slurm.srun("bash", "-c", script, "task", *TASK, "--barrier-timeout", "60", *WORKLOAD, tasks=3)
    assert time.monotonic() - started < 30
    assert done.returncode != 0

    rc, record, err = _collect(tmp_path / "res")
    assert rc == 1, err
    by_node = {n["node"]: n for n in record["nodes"]}
    assert [n["status"] for n in record["nodes"]] == ["failed"] * 3
    assert "missing.jsonl" in by_node[NODES[1]]["error"]
    for node in (NODES[0], NODES[2]):
        assert f"rank 1 of 3 ({NODES[1]}) cannot start" in by_node[node]["error"]
        assert "missing.jsonl" in by_node[node]["error"]
    assert "called off" in record["error"]


def test_tasks_sharing_a_node_name_are_refused_with_the_way_out(slurm: SlurmCluster, tmp_path: Path) -> None:
    # Without --node-from name-rank both tasks are node sn01: the second cannot claim the
    # node's folder, and says so at the barrier, so neither runs.
    task = [a for a in TASK if a not in ("--node-from", "name-rank")]
    done = slurm.srun(*task, "--barrier-timeout", "60", *WORKLOAD, tasks=2)
    assert done.returncode != 0
    assert "another task is node sn01 (several tasks per node: --node-from name-rank)" in done.stderr, done.stderr
    folders = [p.name for p in (tmp_path / "res" / "nodes").iterdir()]
    assert folders == [NODE]
    view = json.loads((tmp_path / "res" / "nodes" / NODE / "run.json").read_text())
    assert view["status"] == "failed" and "--node-from name-rank" in view["error"]
    assert not list((tmp_path / "res" / "nodes" / NODE).glob("slurm-*.json"))  # nothing ran
