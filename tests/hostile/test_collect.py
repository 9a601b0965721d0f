"""`rackscope rack collect` on a results folder that a broken or hostile node wrote into.

Each test starts from the folder of a real two-task run (n01, n02), spoils what node n02 (or
the barrier) left, and checks that collect refuses exactly that, says which file and why, never
reads outside the folder or through a link, does not hang, and still counts n01."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rackscope.cli import main
from tests.rack.tasks import RUN_ID, finished_folder

MIB = 1024 * 1024
N02 = Path("nodes") / "n02"
RECORD = N02 / f"{RUN_ID}.json"
ROWS = N02 / f"{RUN_ID}.requests.jsonl"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_folder(tmp_path_factory)


@pytest.fixture
def folder(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "res"))


@pytest.fixture
def outside(template: Path, tmp_path: Path) -> Path:
    """A folder beside the results folder, holding a perfectly valid copy of n02's files."""
    target = tmp_path / "outside"
    shutil.copytree(template / N02, target)
    return target


def collect(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    code = main(["rack", "collect", str(folder), "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else {}, err


def nodes(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["node"]: n for n in record["nodes"]}


def assert_only_n02_failed(code: int, record: dict[str, Any], *expected: str) -> dict[str, Any]:
    """n01 counted as usual, n02 not; n02's error contains every ``expected`` text."""
    assert code == 1
    by_node = nodes(record)
    assert by_node["n01"]["status"] == "completed"
    assert record["summary"]["nodes_completed"] == 1
    assert record["summary"]["output_tokens"] == by_node["n01"]["output_tokens"] > 0
    n02 = by_node["n02"]
    assert n02["status"] != "completed"
    for text in expected:
        assert text in (n02["error"] or ""), n02["error"]
    return n02


def rewrite_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


# --- size ----------------------------------------------------------------------------------------
def test_an_oversized_record_is_refused_unread(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.truncate(folder / RECORD, 64 * MIB + 1)  # sparse: the size is what is checked, before reading
    code, record, _ = collect(folder, capsys)
    n02 = assert_only_n02_failed(code, record, f"{RECORD}: 67,108,865 bytes, more than the 67,108,864 accepted")
    assert n02["status"] == "failed" and "record" not in n02["files"]


def test_an_oversized_node_file_is_refused(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.truncate(folder / N02 / "node.json", MIB + 1)
    code, record, _ = collect(folder, capsys)
    n02 = assert_only_n02_failed(code, record, "nodes/n02/node.json: 1,048,577 bytes, more than the 1,048,576")
    assert (n02["key"], n02["agent"], n02["files"]) == ("n02", "task 1", {})


# --- shape ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "expected"), [
    (b"{not json", "nodes/n02/node.json: not valid JSON"),
    (b"[1, 2, 3]", "nodes/n02/node.json: a JSON list, expected an object"),
    (json.dumps({"node": "../../etc", "rack": "r1"}).encode(), "nodes/n02/node.json: node: String should match"),
])
def test_a_malformed_node_file_fails_its_node(folder: Path, capsys: pytest.CaptureFixture[str], content: bytes,
                                              expected: str) -> None:
    (folder / N02 / "node.json").write_bytes(content)
    assert_only_n02_failed(*collect(folder, capsys)[:2], expected)


def test_wrong_types_in_node_and_view_are_named(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rewrite_json(folder / N02 / "node.json", lambda o: o.update(rank="1"))
    assert_only_n02_failed(*collect(folder, capsys)[:2], "nodes/n02/node.json: rank: Input should be a valid integer")


def test_a_record_whose_numbers_are_words_is_refused(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rewrite_json(folder / RECORD, lambda o: o["summary"].update(output_tokens_per_s="fast"))
    code, record, _ = collect(folder, capsys)
    assert_only_n02_failed(code, record, f"record not collected: {RECORD}: summary.output_tokens_per_s: Input should "
                                         "be a valid number")


def test_a_record_of_another_run_is_refused(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rewrite_json(folder / RECORD, lambda o: o.update(run_id="other"))
    assert_only_n02_failed(*collect(folder, capsys)[:2], "the record is of run 'other'")


def test_a_run_view_with_a_status_no_task_writes_fails_its_node(folder: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rewrite_json(folder / N02 / "run.json", lambda o: o.update(status="excellent"))
    assert_only_n02_failed(*collect(folder, capsys)[:2], "nodes/n02/run.json: status: Input should be")


# --- identifiers ---------------------------------------------------------------------------------
def test_a_folder_that_is_no_node_name_is_left_out(folder: Path, capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    (folder / N02).rename(folder / "nodes" / "n 02;rm -rf")
    code, record, _ = collect(folder, capsys)
    n02 = assert_only_n02_failed(code, record, "arrived at the start barrier but left no node files")
    assert n02["key"] == ""
    assert [n["node"] for n in record["nodes"]] == ["n01", "n02"]
    ignored = json.loads((folder / "config.json").read_text())["ignored"]
    assert ignored == ["nodes/n 02;rm -rf: not a node name"]
    assert "left out: nodes/n 02;rm -rf: not a node name" in caplog.text


def test_a_second_folder_claiming_a_rank_does_not_replace_it(folder: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(folder / N02, folder / "nodes" / "n09")
    rewrite_json(folder / "nodes" / "n09" / "node.json", lambda o: o.update(node="n09"))
    code, record, _ = collect(folder, capsys)
    assert code == 1
    by_node = nodes(record)
    assert [by_node[n]["status"] for n in ("n01", "n02", "n09")] == ["completed", "completed", "failed"]
    assert "claims rank 1, which nodes/n02 also claims" in by_node["n09"]["error"]
    assert record["summary"]["nodes_completed"] == 2
    assert record["summary"]["output_tokens"] == by_node["n01"]["output_tokens"] + by_node["n02"]["output_tokens"]


def test_barrier_garbage_is_left_out_and_the_run_still_collects(folder: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "barrier" / "7.json").write_text('{"rank": 7, "tasks": 4096}')
    (folder / "barrier" / "notes.txt").write_text("hello")
    (folder / "barrier" / "start.json").write_text("go!")
    code, record, _ = collect(folder, capsys)
    assert code == 0
    assert [n["status"] for n in record["nodes"]] == ["completed", "completed"]
    assert record["start_at"] is None  # the decision is unreadable: its start time is not taken
    ignored = json.loads((folder / "config.json").read_text())["ignored"]
    assert "barrier/start.json: not valid JSON" in ignored
    assert "barrier/notes.txt: not a file a task writes" in ignored
    assert any(line.startswith("barrier/7.json: ") for line in ignored)


# --- links, special files and the rows ---------------------------------------------------------------
def test_a_record_linked_from_outside_is_not_followed(folder: Path, outside: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (folder / RECORD).unlink()
    (folder / RECORD).symlink_to(outside / RECORD.name)  # a valid record: following it would count n02
    code, record, _ = collect(folder, capsys)
    assert_only_n02_failed(code, record, f"{RECORD}: a symbolic link is on the way; links are not followed")


def test_a_node_folder_linked_from_outside_is_not_followed(folder: Path, outside: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(folder / N02)
    (folder / N02).symlink_to(outside, target_is_directory=True)
    code, record, _ = collect(folder, capsys)
    n02 = assert_only_n02_failed(code, record, "nodes/n02: not a folder (links are not followed)")
    assert n02["files"] == {}


def test_a_rows_file_linked_to_a_system_file_is_not_read(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / ROWS).unlink()
    (folder / ROWS).symlink_to("/etc/passwd")
    code, record, _ = collect(folder, capsys)
    assert code == 0  # the record counts; only its latency rows are refused, as in a rack run
    n02 = nodes(record)["n02"]
    assert "requests" not in n02["files"]
    assert f"requests not collected: {ROWS}: a symbolic link is on the way" in n02["error"]
    assert record["summary"]["ttft_s"]["count"] == nodes(record)["n01"]["requests_completed"]


def test_a_linked_nodes_folder_is_bad_input(folder: Path, outside: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.move(folder / "nodes", outside / "nodes")
    (folder / "nodes").symlink_to(outside / "nodes", target_is_directory=True)
    code, record, err = collect(folder, capsys)
    assert (code, record) == (2, {})
    assert "nodes: not a folder (links are not followed)" in err


@pytest.mark.timeout(30)
def test_a_fifo_instead_of_a_file_does_not_hang_collect(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / N02 / "run.json").unlink()
    os.mkfifo(folder / N02 / "run.json")  # nobody writes: a blocking open would wait forever
    assert_only_n02_failed(*collect(folder, capsys)[:2], "nodes/n02/run.json: not a regular file")


def test_rows_that_are_not_the_records_are_not_pooled(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with (folder / ROWS).open("ab") as rows:
        rows.write(b'{"request_id": "forged", "ok": true, "ttft_s": 99.0}\n')
    code, record, _ = collect(folder, capsys)
    assert code == 0
    n02 = nodes(record)["n02"]
    assert "requests" not in n02["files"] and "not the rows its record names" in n02["error"]
    assert record["summary"]["ttft_s"]["max"] < 99.0


def test_a_row_longer_than_the_cap_is_refused_even_when_the_digest_matches(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = b'{"request_id": "r", "pad": "' + b"x" * (2 * MIB) + b'"}\n'
    (folder / ROWS).write_bytes(data)
    digest = {"rows": 1, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    rewrite_json(folder / RECORD, lambda o: o.update(requests_digest=digest))
    code, record, _ = collect(folder, capsys)
    assert code == 0
    assert f"requests not collected: {ROWS}: a row longer than 1,048,576 bytes" in nodes(record)["n02"]["error"]


def test_collect_writes_nothing_but_its_two_files_and_replaces_links_to_them(
        folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (folder / "rack.json").symlink_to(victim)
    before = {p.relative_to(folder) for p in folder.rglob("*")}
    assert collect(folder, capsys)[0] == 0
    after = {p.relative_to(folder) for p in folder.rglob("*")}
    assert after - before == {Path("config.json")}
    assert victim.read_text() == "keep me"
    assert not (folder / "rack.json").is_symlink() and json.loads((folder / "rack.json").read_text())["schema"]
