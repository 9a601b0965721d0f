"""`rackscope rack collect` on folders that real `rackscope rack task` processes left: the bundle
and rack record of `rackscope rack run`, lost and missing nodes, and folders that hold no run.
(Hostile folder contents: tests/hostile/test_collect.py.)"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from rackscope.cli import main
from rackscope.fileio import is_temp_name
from tests.rack.tasks import RUN_ID, finished_folder, node_name

RECORD_KEYS = {"schema", "rack_run_id", "rack", "state", "error", "created_at", "ended_at", "start_at", "lead_time_s",
               "config", "environment", "summary", "timeseries", "nodes"}
ENTRY_KEYS = {"node", "key", "rack", "agent", "status", "error", "run_id", "gpus", "gpu_model", "simulated", "source",
              "started_at", "ended_at", "duration_s", "output_tokens", "output_tokens_per_s",
              "output_tokens_per_s_per_gpu", "requests_completed", "requests_failed", "energy_j", "power_w",
              "output_tokens_per_j", "complete", "straggler", "fraction_of_median", "files"}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_folder(tmp_path_factory)


@pytest.fixture
def folder(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "res", symlinks=True))


def collect(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    code = main(["rack", "collect", str(folder), "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else {}, err


def test_collect_writes_the_bundle_of_a_rack_run(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, record, _ = collect(folder, capsys)
    assert code == 0
    assert record == json.loads((folder / "rack.json").read_text())
    assert set(record) == RECORD_KEYS
    assert (record["schema"], record["rack_run_id"], record["rack"], record["state"]) == (
        "rackscope.rack/1", RUN_ID, "r1", "finished")
    assert [set(n) for n in record["nodes"]] == [ENTRY_KEYS, ENTRY_KEYS]
    assert [(n["node"], n["key"], n["agent"], n["status"]) for n in record["nodes"]] == [
        ("n01", "n01", "task 0", "completed"), ("n02", "n02", "task 1", "completed")]
    for n in record["nodes"]:
        assert n["files"] == {"node": f"nodes/{n['node']}/node.json", "run": f"nodes/{n['node']}/run.json",
                              "record": f"nodes/{n['node']}/{RUN_ID}.json",
                              "requests": f"nodes/{n['node']}/{RUN_ID}.requests.jsonl"}
        assert all((folder / path).is_file() for path in n["files"].values())
    records = [json.loads((folder / "nodes" / node_name(r) / f"{RUN_ID}.json").read_text()) for r in (0, 1)]
    s = record["summary"]
    assert s["complete"] is True and s["nodes_completed"] == 2 and s["gpus_measured"] == 2
    assert s["output_tokens"] == sum(r["summary"]["output_tokens"] for r in records) > 0
    assert math.isclose(s["output_tokens_per_s"], sum(r["summary"]["output_tokens_per_s"] for r in records))
    assert s["requests_completed"] == sum(r["summary"]["requests_completed"] for r in records)
    decision = json.loads((folder / "barrier" / "start.json").read_text())
    assert (record["start_at"], record["lead_time_s"]) == (decision["start_at"], 0.2)
    assert record["config"]["agents"] == ["task 0", "task 1"]
    assert record["config"]["engine"] == "sim" and record["config"]["duration_s"] == 2.0
    config = json.loads((folder / "config.json").read_text())
    assert (config["schema"], config["tasks"], config["collected_from"], config["ignored"]) == (
        "rackscope.rack/1", 2, "rack tasks", [])
    assert config["run"] == decision["run"]
    assert not [p for p in folder.rglob("*") if is_temp_name(p.name)]


def test_compare_reads_a_collected_bundle_node_by_node(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert collect(folder, capsys)[0] == 0
    rack = str(folder / "rack.json")
    assert main(["compare", rack, rack, "--format", "json", "--resamples", "100"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # The rack as a whole, then each node from its record and rows in the bundle.
    assert {row["node"] for row in rows} == {None, "n01", "n02"}
    tokens = {row["node"]: row for row in rows if row["metric"] == "output_tokens_per_s"}
    assert tokens["n01"]["basis"] == "bootstrap" and tokens["n01"]["verdict"] == "no change"


def test_collect_is_repeatable(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = collect(folder, capsys)[1]
    second = collect(folder, capsys)[1]
    assert first == second


def test_a_node_without_a_final_status_is_lost(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    view_path = folder / "nodes" / "n02" / "run.json"
    view = json.loads(view_path.read_text())
    view_path.write_text(json.dumps({**view, "status": "running", "ended_at": None, "summary": None}))
    code, record, _ = collect(folder, capsys)
    assert code == 1
    n01, n02 = record["nodes"]
    assert (n01["status"], n02["status"]) == ("completed", "lost")
    assert "left no final status (its run.json says running)" in n02["error"]
    assert record["summary"]["output_tokens"] == n01["output_tokens"]
    assert record["summary"]["failed_nodes"] == [
        {"node": "n02", "agent": "task 1", "status": "lost", "error": n02["error"]}]


def test_a_rank_without_files_is_missing(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(folder / "nodes" / "n02")
    (folder / "barrier" / "1.json").unlink()
    code, record, _ = collect(folder, capsys)
    assert code == 1
    missing = record["nodes"][1]
    assert (missing["node"], missing["status"], missing["key"], missing["files"]) == ("task 1", "missing", "", {})
    assert missing["error"].startswith("task rank 1 of 2 left no files")


@pytest.mark.parametrize("make", ["empty", "absent", "file", "rack-run-bundle"])
def test_a_folder_without_a_task_run_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str) -> None:
    folder = tmp_path / "res"
    if make == "empty":
        folder.mkdir()
    elif make == "file":
        folder.write_text("{}")
    elif make == "rack-run-bundle":  # agent identities, no ranks: not a task run
        (folder / "nodes" / "n01").mkdir(parents=True)
        (folder / "nodes" / "n01" / "node.json").write_text(json.dumps({"rack": "r1", "node": "n01", "gpus": []}))
    code, record, err = collect(folder, capsys)
    assert (code, record) == (2, {})
    assert "rackscope rack: error:" in err
    assert ("holds no rack task files" in err) if make in ("empty", "rack-run-bundle") else ("is not a folder" in err)
    assert not (folder / "rack.json").exists()
