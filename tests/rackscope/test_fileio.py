"""Atomic writes: temporary files named after their writer, and the removal of those whose
writer is gone, never of a live writer's."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from rackscope.errors import ResultError
from rackscope.fileio import atomic_writer, is_temp_name, remove_stale_temps, temp_path, write_bytes, write_json
from tests.helpers import start_limited, stop_process


def dead_pid() -> int:
    """The id of a process that has exited and been reaped."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if is_temp_name(p.name))


def test_temp_name_says_whose_it_is(tmp_path: Path) -> None:
    tmp = temp_path(tmp_path / "run.json", 4242, 7)
    assert tmp == tmp_path / ".run.json.tmp.4242.7"
    assert is_temp_name(tmp.name)
    assert not is_temp_name("run.json")
    assert not is_temp_name(".run.json.abc123.tmp")  # another program's: not ours to remove
    long = temp_path(tmp_path / ("x" * 250), 1, 0)
    assert len(long.name) < 255


def test_write_leaves_no_temp_and_an_ordinary_file(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"v": 1})
    assert orjson.loads((tmp_path / "a.json").read_bytes()) == {"v": 1}
    assert temps(tmp_path) == []


def test_a_failed_write_removes_its_temp_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})

    def interrupted() -> None:
        with atomic_writer(target) as handle:
            handle.write(b"half")
            raise ValueError("midway")

    with pytest.raises(ValueError, match="midway"):
        interrupted()
    assert orjson.loads(target.read_bytes()) == {"v": 1}
    assert temps(tmp_path) == []


def test_write_into_a_missing_directory_is_a_result_error(tmp_path: Path) -> None:
    with pytest.raises(ResultError, match="cannot write .*nowhere"):
        write_bytes(tmp_path / "nowhere" / "a.json", b"{}")


def test_leftovers_of_dead_writers_go_on_the_next_write(tmp_path: Path) -> None:
    pid = dead_pid()
    for name in ("run.json", "run.requests.jsonl"):
        temp_path(tmp_path / name, pid, 0).write_bytes(b"half a file")
    foreign = tmp_path / ".other.json.x1y2.tmp"
    foreign.write_bytes(b"not ours")
    write_json(tmp_path / "next.json", {"v": 2})
    assert temps(tmp_path) == []
    assert foreign.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.x1y2.tmp", "next.json"]


def test_a_locked_temp_stays_even_when_its_process_looks_gone(tmp_path: Path) -> None:
    # A writer in another PID namespace (a container sharing the volume) looks gone from
    # here; the lock it holds on its file still says it is writing.
    tmp = temp_path(tmp_path / "run.json", dead_pid(), 0)
    tmp.write_bytes(b"being written")
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert remove_stale_temps(tmp_path) == []
        assert tmp.exists()
    finally:
        os.close(fd)
    assert remove_stale_temps(tmp_path) == [tmp]


SLOW_WRITER = """
import sys
from pathlib import Path
from rackscope.fileio import atomic_writer

with atomic_writer(Path(sys.argv[1])) as handle:
    handle.write(b'{"part": 1')
    handle.flush()
    print("writing", flush=True)
    sys.stdin.readline()
    handle.write(b', "done": true}')
print("written", flush=True)
"""


def test_a_live_writers_temp_is_never_removed(tmp_path: Path) -> None:
    target = tmp_path / "slow.json"
    writer = start_limited([sys.executable, "-c", SLOW_WRITER, str(target)], stdin=subprocess.PIPE)
    try:
        assert writer.stdout is not None
        assert writer.stdin is not None
        assert writer.stdout.readline().strip() == "writing"
        live = temp_path(target, writer.pid, 0)
        assert temps(tmp_path) == [live.name]
        stale = temp_path(tmp_path / "old.json", dead_pid(), 3)
        stale.write_bytes(b"left by a killed run")
        write_json(tmp_path / "other.json", {"v": 1})  # tidies the directory
        assert temps(tmp_path) == [live.name]
        writer.stdin.write("go on\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "written"
        assert writer.wait(timeout=30) == 0
    finally:
        stop_process(writer)
    assert orjson.loads(target.read_bytes()) == {"part": 1, "done": True}
    assert temps(tmp_path) == []
