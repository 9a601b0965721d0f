"""Run records under crashes, full disks and swapped files: a record and the per-request rows
beside it either belong to one run or are refused with a clear error, a run's summary is
shown even when its record cannot be written, and temporary files of killed writers go.

Every run here is a real ``rackscope run --engine sim`` process; the full disk is real too:
the process runs with a file-size limit (RLIMIT_FSIZE) and SIGXFSZ ignored, so its writes
past the limit fail with EFBIG as they would with ENOSPC.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from rackscope.errors import ResultError
from rackscope.fileio import is_temp_name
from rackscope.runner.results.io import load_requests, load_run, read_rows
from tests.helpers import rackscope_command, start_limited, stop_process, wait_for

pytestmark = pytest.mark.slow

# Small and quick: four requests on virtual time. Their rows (about 1.2 kB) are far smaller
# than their record (about 6 kB), so a file-size limit between the two fails the record only.
SMALL_RUN = ("run", "--engine", "sim", "--virtual-clock", "--requests", "4", "--output-len", "16", "--warmup", "0")
# Enough requests that writing their rows (about 30 MB) takes a visible while.
BIG_RUN = ("run", "--engine", "sim", "--virtual-clock", "--requests", "100000", "--input-len", "16",
           "--output-len", "16", "--warmup", "0")
RUN_TIMEOUT_S = 120.0

# Sets the file-size limit, ignores SIGXFSZ (both survive exec), then becomes rackscope.
FULL_DISK = """
import os, resource, signal, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
os.execv(sys.argv[2], sys.argv[2:])
"""


def rackscope(*args: str, file_limit_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    argv = rackscope_command(*args)
    if file_limit_bytes is not None:
        argv = [sys.executable, "-c", FULL_DISK, str(file_limit_bytes), *argv]
    proc = start_limited(argv)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        stop_process(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if is_temp_name(p.name))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def first_run(out: Path, *extra: str) -> dict[str, bytes]:
    """A complete run at ``out``; what its directory holds afterwards."""
    done = rackscope(*SMALL_RUN, "--seed", "1", *extra, "--output", str(out))
    assert done.returncode == 0, done.stderr
    record = load_run(out)
    assert record["requests_digest"]["rows"] == 4
    return snapshot(out.parent)


def assert_summary_printed(stdout: str) -> None:
    assert "output tokens/s" in stdout
    assert "TTFT  ms p50/p90/p99" in stdout


# --- a full disk --------------------------------------------------------------------------------------
def test_full_disk_at_the_record_still_prints_the_summary_and_exits_1(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    before = first_run(out)
    rows_size, record_size = len(before["out.requests.jsonl"]), len(before["out.json"])
    assert rows_size * 2 < record_size
    limit = (rows_size + record_size) // 2  # the new rows fit; the new record does not

    failed = rackscope(*SMALL_RUN, "--seed", "2", "--output", str(out), file_limit_bytes=limit)

    assert failed.returncode == 1, failed.stderr
    assert_summary_printed(failed.stdout)
    assert f"rackscope run: error: the run ended but its record was not written: cannot write {out}: " \
           "File too large" in failed.stderr
    assert "Traceback" not in failed.stderr
    after = snapshot(tmp_path)
    assert temps(tmp_path) == []
    assert after["out.json"] == before["out.json"]  # no half-written record: the old one, whole
    # The new rows did land: the state a crash between the two renames leaves. The old record
    # names other rows, and every reader says so rather than pairing them.
    assert after["out.requests.jsonl"] != before["out.requests.jsonl"]
    with pytest.raises(ResultError, match=r"out\.requests\.jsonl does not belong to the record .*out\.json"):
        load_run(out)
    with pytest.raises(ResultError, match="does not belong to the record"):
        read_rows(out)
    compare = rackscope("compare", str(out), str(out))
    assert compare.returncode == 2
    assert "rackscope compare: error: " in compare.stderr and "does not belong to the record" in compare.stderr
    report = rackscope("report", str(out), "--output", str(tmp_path / "report"))
    assert report.returncode == 2
    assert "does not belong to the record" in report.stderr


def test_full_disk_at_the_rows_leaves_the_old_pair_whole(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    before = first_run(out)
    failed = rackscope(*SMALL_RUN, "--seed", "2", "--output", str(out), file_limit_bytes=512)
    assert failed.returncode == 1, failed.stderr
    assert_summary_printed(failed.stdout)
    assert f"its record was not written: cannot write {tmp_path / 'out.requests.jsonl'}: File too large" \
        in failed.stderr
    assert snapshot(tmp_path) == before
    assert load_run(out)["requests_digest"]["rows"] == 4


def test_full_disk_on_a_first_run_writes_nothing(tmp_path: Path) -> None:
    failed = rackscope(*SMALL_RUN, "--output", str(tmp_path / "new.json"), file_limit_bytes=512)
    assert failed.returncode == 1, failed.stderr
    assert_summary_printed(failed.stdout)
    assert "its record was not written" in failed.stderr
    assert list(tmp_path.iterdir()) == []


# --- SIGKILL ------------------------------------------------------------------------------------------
def kill_when(proc: subprocess.Popen[str], what: str, check: Callable[[], object]) -> object:
    """SIGKILL ``proc`` as soon as ``check`` holds; what ``check`` returned."""
    try:
        seen = wait_for(what, check, timeout_s=RUN_TIMEOUT_S, interval_s=0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == -signal.SIGKILL
    return seen


def test_killed_mid_run_then_mid_write_leaves_the_old_pair_and_the_next_run_clears_up(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    before = first_run(out)

    # Killed mid-run, once its engine has started: nothing of it reaches the directory.
    running = start_limited(rackscope_command(
        "run", "--engine", "sim", "--scenario", "concurrency", "--concurrency", "4", "--duration", "60",
        "--warmup", "0", "--output", str(out),
    ))
    assert running.stderr is not None
    stderr = running.stderr
    kill_when(running, "the run to start", lambda: "simulated engine" in stderr.readline())
    assert snapshot(tmp_path) == before
    assert load_run(out)["requests_digest"]["rows"] == 4

    # Killed while it writes its rows: half a rows file stays behind, under its own name.
    writing = start_limited(rackscope_command(*BIG_RUN, "--output", str(out)))
    name = kill_when(writing, "the rows being written", lambda: next(
        (p.name for p in tmp_path.iterdir() if p.name.startswith(".out.requests.jsonl")), None))
    left = snapshot(tmp_path)
    assert sorted(left) == sorted([*before, str(name)])
    assert {n: left[n] for n in before} == before
    assert load_run(out)["requests_digest"]["rows"] == 4

    # The next run into the directory (another file) removes it; the old pair stays valid.
    done = rackscope(*SMALL_RUN, "--output", str(tmp_path / "next.json"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "next.json", "next.requests.jsonl", "out.json", "out.requests.jsonl",
    ]
    assert name == f".out.requests.jsonl.tmp.{writing.pid}.0"
    assert f"removed {tmp_path / str(name)}, left by process {writing.pid} which is gone" in done.stderr
    assert snapshot(tmp_path)["out.json"] == before["out.json"]
    assert load_run(out)["requests_digest"]["rows"] == 4
    assert load_run(tmp_path / "next.json")["requests_digest"]["rows"] == 4
    assert len(list(load_requests(tmp_path / "next.requests.jsonl"))) == 4


# --- swapped files -----------------------------------------------------------------------------------
def test_rows_swapped_in_from_another_run_are_refused(tmp_path: Path) -> None:
    first_run(tmp_path / "a" / "out.json")
    first_run(tmp_path / "b" / "out.json", "--output-len", "8")
    (tmp_path / "a" / "out.requests.jsonl").write_bytes((tmp_path / "b" / "out.requests.jsonl").read_bytes())
    a, b = str(tmp_path / "a" / "out.json"), str(tmp_path / "b" / "out.json")
    compare = rackscope("compare", b, a)
    assert compare.returncode == 2
    assert f"rackscope compare: error: {tmp_path / 'a' / 'out.requests.jsonl'} does not belong to the record {a}" \
        in compare.stderr
    assert "the record names 4 rows" in compare.stderr
    report = rackscope("report", a, "--output", str(tmp_path / "report"))
    assert report.returncode == 2
    assert "does not belong to the record" in report.stderr


def test_the_agent_refuses_to_serve_rows_that_are_not_its_records(tmp_path: Path) -> None:
    results = tmp_path / "results"
    agent = start_limited(rackscope_command(
        "agent", "--source", "sim", "--gpus", "1", "--gpu-model", "h100", "--rack", "r1", "--node", "n1",
        "--metrics-port", "0", "--api-port", "0", "--results-dir", str(results),
    ), stdout=subprocess.DEVNULL)
    try:
        assert agent.stderr is not None
        stderr = agent.stderr
        port = wait_for("the agent's ready line", lambda: (m := re.search(
            r"rackscope agent ready .*api_port=(\d+)", stderr.readline())) and int(m.group(1)), timeout_s=60)
        url = f"http://127.0.0.1:{port}/v1/runs"
        for run_id, output_len in (("mine", 16), ("other", 8)):
            body = {"engine": "sim", "scenario": "concurrency", "concurrency": 2, "requests": 4,
                    "output_len": output_len, "warmup_auto": False, "run_id": run_id}
            assert httpx.post(url, json=body, timeout=30).status_code == 201
            wait_for(f"run {run_id} written",
                     lambda r=run_id: httpx.get(f"{url}/{r}", timeout=10).json()["record_path"], timeout_s=60)
        rows = httpx.get(f"{url}/mine/requests", timeout=10)
        assert rows.status_code == 200
        assert rows.content == (results / "mine.requests.jsonl").read_bytes()
        record = httpx.get(f"{url}/mine/record", timeout=10).json()
        assert record["requests_digest"]["sha256"] == hashlib.sha256(rows.content).hexdigest()

        (results / "mine.requests.jsonl").write_bytes((results / "other.requests.jsonl").read_bytes())
        for what in ("requests", "record"):
            refused = httpx.get(f"{url}/mine/{what}", timeout=10)
            assert refused.status_code == 500
            assert "mine.requests.jsonl does not belong to the record" in refused.json()["detail"]
        assert httpx.get(f"{url}/other/requests", timeout=10).status_code == 200
    finally:
        stop_process(agent, timeout_s=15)
