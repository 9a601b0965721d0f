"""Run records: exact statistics on constructed requests, the record layout, atomic writes, loading,
and the digest that ties a record to its per-request rows."""

from __future__ import annotations

import hashlib
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from rackscope.errors import ResultError
from rackscope.fileio import atomic_writer, write_json
from rackscope.runner.compare import load_comparable
from rackscope.runner.records import RequestRecord
from rackscope.runner.report import load_input
from rackscope.runner.results.io import (
    digest_file,
    load_requests,
    load_run,
    read_rows,
    record_of,
    requests_path,
    rows_of,
    write_rows,
    write_run,
)
from rackscope.runner.results.record import SCHEMA, RunResult
from rackscope.runner.results.series import timeseries
from rackscope.runner.results.stats import distribution, percentile
from rackscope.runner.results.window import Limits, Phase, summarize, tokens_between


def ok(rid: str, start: float, first: float, end: float, out: int, *, inp: int = 10, gpu: int | None = None,
       itl: list[float] | None = None) -> RequestRecord:
    return RequestRecord(rid, start, first, end, inp, out, "usage", True, None, None, itl, gpu)


def failed(rid: str, start: float, end: float, error_type: str, out: int = 0) -> RequestRecord:
    return RequestRecord(rid, start, None, end, 10, out, "counted", False, error_type, "boom")


def test_percentiles_are_exact_linear_interpolation() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 99.9) == pytest.approx(99.901)
    assert percentile([7.0], 99.9) == 7.0
    assert percentile([1.0, 3.0], 50) == 2.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_distribution_keys_and_empty() -> None:
    d = distribution([4.0, 1.0, 3.0, 2.0])
    assert d == {"count": 4, "mean": 2.5, "min": 1.0, "max": 4.0, "p50": 2.5, "p90": pytest.approx(3.7),
                 "p95": pytest.approx(3.85), "p99": pytest.approx(3.97), "p999": pytest.approx(3.997)}
    empty = distribution([])
    assert empty["count"] == 0
    assert empty["p99"] is None
    assert empty["mean"] is None


def constructed_phase() -> Phase:
    # Five finished requests with known TTFT / TPOT / E2E, one HTTP 500, one timeout, one
    # stopped at the deadline with 6 tokens.
    records = [
        ok("a", 0.0, 0.1, 1.1, 11, gpu=0),  # ttft 0.1, tpot 0.1, e2e 1.1
        ok("b", 0.0, 0.2, 2.2, 21, gpu=1),  # ttft 0.2, tpot 0.1, e2e 2.2
        ok("c", 1.0, 1.3, 2.3, 6, gpu=0),  # ttft 0.3, tpot 0.2, e2e 1.3
        ok("d", 2.0, 2.4, 3.4, 11, gpu=1),  # ttft 0.4, tpot 0.1, e2e 1.4
        ok("e", 3.0, 3.5, 3.5, 1, gpu=0),  # ttft 0.5, one token: no tpot
        failed("f", 1.0, 1.5, "http_5xx"),
        failed("g", 1.0, 2.5, "timeout", out=3),
        RequestRecord("h", 3.0, 3.2, 4.0, 10, 6, "engine", False, "cancelled", "deadline", None, 1),
    ]
    return Phase(records, 0.0, 4.0, {"n01/0": 100.0, "n01/1": 200.0}, {"n01/0": 300.0, "n01/1": 500.0})


def test_summary_values_on_constructed_records() -> None:
    s = summarize(constructed_phase(), gpus=2)
    assert s["requests_issued"] == 8
    assert s["requests_completed"] == 5
    assert s["requests_failed"] == 2
    assert s["requests_failed_by_error"] == {"http_5xx": 1, "timeout": 1}
    assert s["requests_cancelled"] == 1
    # Output: finished 11+21+6+11+1 = 50, plus 6 from the request stopped at the deadline.
    assert s["output_tokens"] == 56
    assert s["input_tokens"] == 60  # six requests reached their first token
    assert s["duration_s"] == 4.0
    assert s["output_tokens_per_s"] == 14.0
    assert s["output_tokens_per_s_per_gpu"] == 7.0
    assert s["requests_per_s"] == 1.25
    assert s["energy_j"] == 500.0
    assert s["average_power_w"] == 125.0
    assert s["output_tokens_per_j"] == pytest.approx(56 / 500)
    assert s["ttft_s"]["p50"] == pytest.approx(0.3)
    assert s["ttft_s"]["mean"] == pytest.approx(0.3)
    assert s["ttft_s"]["p99"] == pytest.approx(0.496)
    assert s["tpot_s"]["count"] == 4
    assert s["tpot_s"]["p50"] == pytest.approx(0.1)
    assert s["tpot_s"]["max"] == pytest.approx(0.2)
    assert s["e2e_s"]["p50"] == pytest.approx(1.3)
    assert s["itl_method"] == "tpot"
    assert s["itl_s"] == s["tpot_s"]
    assert s["complete"] is True
    assert "valid" not in s


def test_itl_from_token_gaps_when_the_engine_gives_them() -> None:
    records = [
        ok("a", 0.0, 0.1, 0.4, 4, itl=[0.1, 0.1, 0.1]),
        ok("b", 0.0, 0.1, 0.7, 4, itl=[0.1, 0.2, 0.3]),
    ]
    s = summarize(Phase(records, 0.0, 1.0), gpus=None)
    assert s["itl_method"] == "token_gaps"
    assert s["itl_s"]["count"] == 6
    assert s["itl_s"]["max"] == pytest.approx(0.3)
    assert s["itl_s"]["p50"] == pytest.approx(0.1)
    assert s["output_tokens_per_s_per_gpu"] is None
    assert s["energy_j"] is None
    assert s["output_tokens_per_j"] is None
    records.append(ok("c", 0.0, 0.1, 0.4, 4))
    assert summarize(Phase(records, 0.0, 1.0), gpus=None)["itl_method"] == "mixed"


def test_server_validity_and_goodput() -> None:
    phase = constructed_phase()
    generous = summarize(phase, gpus=2, limits=Limits(ttft_s=2.0, tpot_s=0.2))
    assert generous["validity"] == "VALID"
    assert generous["valid"] is True
    assert generous["goodput_requests_per_s"] == 5 / 4.0
    # p99 TTFT 0.496 s > 0.45 s; request "e" (0.5 s) misses, "c" misses TPOT 40 ms too.
    tight = summarize(phase, gpus=2, limits=Limits(ttft_s=0.45, tpot_s=0.15))
    assert tight["validity"] == "INVALID"
    assert tight["valid"] is False
    assert any("p99 TTFT" in r for r in tight["validity_reasons"])
    assert tight["goodput_requests_per_s"] == 3 / 4.0  # a, b, d
    assert tight["goodput_fraction"] == 3 / 5
    incomplete = Phase(phase.records, 0.0, 4.0, complete=False, stop_reason="cancelled")
    assert summarize(incomplete, gpus=2, limits=Limits(2.0, 0.2))["validity_reasons"] == ["run incomplete"]


def test_tokens_between_exact_and_prorated() -> None:
    exact = ok("a", 0.0, 1.0, 4.0, 4, itl=[1.0, 1.0, 1.0])  # tokens at 1, 2, 3, 4
    assert tokens_between(exact, 1.5, 3.5) == 2.0
    assert tokens_between(exact, 0.0, 10.0) == 4.0
    spread = ok("b", 0.0, 1.0, 5.0, 9)  # first at 1, 8 more evenly over (1, 5]
    assert tokens_between(spread, 3.0, 5.0) == pytest.approx(4.0)
    assert tokens_between(spread, 0.0, 1.0) == pytest.approx(1.0)


def test_carried_requests_count_only_inside_the_window() -> None:
    measured = [ok("m", 2.0, 2.5, 3.5, 11)]
    warm = ok("w", 0.0, 1.0, 3.0, 21)  # 20 tokens over (1, 3]: 10 of them after t = 2
    phase = Phase(measured, 2.0, 4.0, carried=[(warm, None)])
    s = summarize(phase, gpus=1)
    assert s["output_tokens"] == 21
    assert s["requests_completed"] == 1
    assert s["input_tokens"] == 10  # the carried request's prompt was read before the window
    # With the count it had when the window opened (exact): 21 - 15 = 6.
    phase_exact = Phase(measured, 2.0, 4.0, carried=[(warm, 15)])
    assert summarize(phase_exact, gpus=1)["output_tokens"] == 17


def test_timeseries_buckets() -> None:
    records = [ok("a", 0.0, 0.5, 2.5, 5)]  # 1 token at 0.5, 4 spread over (0.5, 2.5]
    phase = Phase(records, 0.0, 3.0, {"g/0": 0.0}, {"g/0": 300.0}, [(1.0, {"g/0": 100.0}), (2.0, {"g/0": 150.0})])
    ts = timeseries(phase)
    assert ts["t_s"] == [0.0, 1.0, 2.0]
    assert ts["output_tokens_per_s"] == pytest.approx([2.0, 2.0, 1.0])
    assert ts["requests_completed"] == [0, 0, 1]
    assert ts["power_w"] == pytest.approx([100.0, 50.0, 150.0])


def make_result(tmp_phase: Phase | None = None) -> RunResult:
    return RunResult(
        run_id="r1",
        config={"scenario": "concurrency", "engine": "sim"},
        environment={"engine": "sim"},
        started_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        ended_at=datetime(2025, 1, 2, 3, 4, 9, tzinfo=UTC),
        phases=[tmp_phase or constructed_phase()],
        node="n01",
        gpus=2,
    )


def test_record_layout_and_per_gpu_totals(tmp_path: Path) -> None:
    out = write_run(make_result(), tmp_path / "run.json")
    record = load_run(out)
    assert record["schema"] == SCHEMA
    assert record["started_at"] == "2025-01-02T03:04:05.000Z"
    assert record["requests_file"] == "run.requests.jsonl"
    per_gpu = {g["gpu"]: g for g in record["per_gpu"]}
    assert set(per_gpu) == {"n01/0", "n01/1"}
    assert per_gpu["n01/0"]["output_tokens"] == 18  # a, c, e
    assert per_gpu["n01/1"]["output_tokens"] == 38  # b, d, h (6 stopped at the deadline)
    assert per_gpu["n01/0"]["energy_j"] == 200.0
    assert per_gpu["n01/0"]["output_tokens_per_j"] == pytest.approx(18 / 200)
    assert per_gpu["n01/1"]["requests_completed"] == 2
    assert record["per_node"] == [pytest.approx({
        "node": "n01", "input_tokens": 60, "output_tokens": 56, "requests_completed": 5,
        "output_tokens_per_s": 14.0, "energy_j": 500.0, "average_power_w": 125.0, "output_tokens_per_j": 0.112,
    })]
    rows = list(load_requests(tmp_path / "run.requests.jsonl"))
    assert [r["request_id"] for r in rows] == list("abcdefgh")
    assert rows[0]["ttft_s"] == pytest.approx(0.1)
    assert rows[5]["error_type"] == "http_5xx"
    assert not list(tmp_path.glob(".*.tmp.*"))
    mode = stat.S_IMODE(os.stat(out).st_mode)
    assert mode & stat.S_IRGRP  # an ordinary readable file, not mkstemp's 0600


def test_requests_path() -> None:
    assert requests_path(Path("a/out.json")) == Path("a/out.requests.jsonl")
    assert requests_path(Path("run")) == Path("run.requests.jsonl")


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    write_json(path, {"v": 1})
    with pytest.raises(ResultError, match="not serialisable"):
        write_json(path, {"v": object()})
    assert orjson.loads(path.read_bytes()) == {"v": 1}

    rows_path = tmp_path / "run.requests.jsonl"
    write_rows(rows_path, [{"i": 0}])

    def rows() -> Any:
        yield {"i": 1}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_rows(rows_path, rows())
    assert rows_path.read_bytes() == b'{"i":0}\n'

    def interrupted_write() -> None:
        with atomic_writer(path) as handle:
            handle.write(b"half a rec")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_write()
    assert orjson.loads(path.read_bytes()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.requests.jsonl"]


def test_write_into_missing_directory_creates_it(tmp_path: Path) -> None:
    out = write_run(make_result(), tmp_path / "deep" / "er" / "run.json")
    assert out.exists()
    assert (tmp_path / "deep" / "er" / "run.requests.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"summary": {}}', "no 'schema' field"),
        (b'{"schema": "rackscope.rack/1", "summary": {}}', "is not one of rackscope.run/1"),
        (b'{"schema": "rackscope.run/2", "summary": {}}', "not supported"),
        (b'{"schema": "rackscope.run/1"}', "'summary' missing"),
        (b'{"schema": "rackscope.run/1", "summary": {"complete": true}}', "summary lacks requests_completed"),
    ],
)
def test_loader_rejects_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ResultError, match=message):
        load_run(path)


def test_loader_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ResultError, match="cannot read"):
        load_run(tmp_path / "missing.json")


def test_sweep_record_has_one_point_each(tmp_path: Path) -> None:
    p1 = Phase([ok("a", 0.0, 0.1, 1.0, 10)], 0.0, 1.0, point={"concurrency": 1})
    p2 = Phase([ok("b", 2.0, 2.1, 3.0, 20), ok("c", 2.0, 2.2, 3.0, 20)], 2.0, 3.0, point={"concurrency": 8})
    result = make_result()
    result.phases = [p1, p2]
    result.sweep = True
    record = load_run(write_run(result, tmp_path / "sweep.json"))
    assert [p["point"] for p in record["points"]] == [{"concurrency": 1}, {"concurrency": 8}]
    assert [p["summary"]["output_tokens_per_s"] for p in record["points"]] == [10.0, 40.0]
    # The headline is one point (no limits: the fastest), not the two averaged; sums are totals.
    assert record["summary"]["output_tokens_per_s"] == 40.0
    assert record["summary"]["output_tokens"] == 40
    assert record["summary"]["sweep"] == {
        "points": 2, "point_index": 1, "point": {"concurrency": 8}, "chosen_by": "no_limits",
        "totals": {"requests_completed": 3, "requests_failed": 0, "input_tokens": 30, "output_tokens": 50,
                   "duration_s": 2.0, "energy_j": None},
    }
    rows = list(load_requests(tmp_path / "sweep.requests.jsonl"))
    assert [r["point"] for r in rows] == [0, 1, 1]


def test_sweep_headline_is_the_fastest_point_meeting_the_limits(tmp_path: Path) -> None:
    slow = Phase([ok("a", 0.0, 0.1, 1.0, 10)], 0.0, 1.0, point={"rate": 1.0})
    # Faster, but its p99 TTFT (about 0.3 s) breaks the 0.15 s limit.
    fast = Phase([ok("b", 2.0, 2.1, 3.0, 20), ok("c", 2.0, 2.3, 3.0, 20)], 2.0, 3.0, point={"rate": 4.0})
    result = make_result()
    result.phases, result.sweep, result.limits = [slow, fast], True, Limits(ttft_s=0.15, tpot_s=1.0)
    record = load_run(write_run(result, tmp_path / "sweep.json"))
    assert [p["summary"]["valid"] for p in record["points"]] == [True, False]
    s = record["summary"]
    assert (s["output_tokens_per_s"], s["valid"], s["ttft_s"]["p99"]) == (10.0, True, pytest.approx(0.1))
    assert (s["sweep"]["point"], s["sweep"]["chosen_by"]) == ({"rate": 1.0}, "meets_limits")

    result = make_result()
    result.phases, result.sweep, result.limits = [slow, fast], True, Limits(ttft_s=0.05, tpot_s=1.0)
    s = result.summary
    assert (s["output_tokens_per_s"], s["valid"]) == (40.0, False)
    assert (s["sweep"]["point"], s["sweep"]["chosen_by"]) == ({"rate": 4.0}, "no_point_meets_limits")


# --- record and rows belong together -------------------------------------------------------------
def test_record_names_its_rows_by_count_size_and_digest(tmp_path: Path) -> None:
    out = write_run(make_result(), tmp_path / "run.json")
    record = load_run(out)
    rows_file = tmp_path / "run.requests.jsonl"
    data = rows_file.read_bytes()
    assert record["requests_digest"] == {
        "rows": 8, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert digest_file(rows_file).to_json() == record["requests_digest"]
    assert read_rows(out) == data
    assert load_comparable(out)["run_id"] == "r1"


def test_rows_swapped_in_from_another_run_are_refused(tmp_path: Path) -> None:
    first = write_run(make_result(), tmp_path / "a" / "run.json")
    other = make_result(Phase([ok("z", 0.0, 0.1, 1.0, 3)], 0.0, 1.0))
    write_run(other, tmp_path / "b" / "run.json")
    # The other run's rows, under the first record's rows name.
    (tmp_path / "a" / "run.requests.jsonl").write_bytes((tmp_path / "b" / "run.requests.jsonl").read_bytes())
    for load in (load_run, read_rows, load_comparable):
        with pytest.raises(ResultError, match=r"run\.requests\.jsonl does not belong to the record .*run\.json: "
                                              r"the record names 8 rows, .* the file has 1 rows"):
            load(first)
    # The summary alone is still there for whoever asks for it without the rows.
    assert load_run(first, check_rows=False)["summary"]["requests_completed"] == 5


def test_rows_edited_in_place_keep_their_count_and_size_but_not_their_digest(tmp_path: Path) -> None:
    out = write_run(make_result(), tmp_path / "run.json")
    rows_file = tmp_path / "run.requests.jsonl"
    data = rows_file.read_bytes()
    rows_file.write_bytes(data.replace(b'"request_id":"a"', b'"request_id":"A"'))
    with pytest.raises(ResultError, match=f"the file has 8 rows, {len(data)} bytes, sha256"):
        load_run(out)


def test_record_without_digest_from_before_it_existed_still_loads(tmp_path: Path) -> None:
    out = write_run(make_result(), tmp_path / "run.json")
    old = orjson.loads(out.read_bytes())
    del old["requests_digest"]
    write_json(out, old)
    # Its rows are whatever sits beside it: nothing to check them against.
    (tmp_path / "run.requests.jsonl").write_bytes(b'{"request_id": "x", "ok": true}\n')
    record = load_run(out)
    assert record["summary"]["output_tokens"] == 56
    assert "requests_digest" not in record
    assert read_rows(out) == b'{"request_id": "x", "ok": true}\n'
    assert [r["request_id"] for r in load_requests(tmp_path / "run.requests.jsonl")] == ["x"]
    assert load_comparable(out)["summary"]["requests_completed"] == 5  # rackscope compare
    assert load_input(out).notes == []  # rackscope report, with its rows


def test_record_whose_rows_file_is_absent_loads_but_its_rows_cannot_be_read(tmp_path: Path) -> None:
    out = write_run(make_result(), tmp_path / "run.json")
    (tmp_path / "run.requests.jsonl").unlink()
    assert load_run(out)["run_id"] == "r1"
    with pytest.raises(ResultError, match="cannot read .*run.requests.jsonl"):
        read_rows(out)


@pytest.mark.parametrize(
    ("digest", "message"),
    [
        ([1, 2], "'requests_digest' must be an object"),
        ({"rows": -1, "bytes": 0, "sha256": "0" * 64}, "rows must be a count"),
        ({"rows": 1, "bytes": True, "sha256": "0" * 64}, "bytes must be a count"),
        ({"rows": 1, "bytes": 2, "sha256": "ABC"}, "sha256 must be 64 lower-case hex digits"),
    ],
)
def test_malformed_digest_is_refused(tmp_path: Path, digest: Any, message: str) -> None:
    out = write_run(make_result(), tmp_path / "run.json")
    record = orjson.loads(out.read_bytes())
    record["requests_digest"] = digest
    write_json(out, record)
    with pytest.raises(ResultError, match=message):
        load_run(out)


def test_hosted_run_serves_the_same_rows_from_memory_and_from_its_files(tmp_path: Path) -> None:
    result = make_result()
    in_memory = record_of(result, None)
    body = rows_of(result, None)
    assert in_memory["requests_file"] == "r1.requests.jsonl"
    assert in_memory["requests_digest"]["sha256"] == hashlib.sha256(body).hexdigest()
    out = write_run(result, tmp_path / "r1.json")
    assert rows_of(result, out) == body
    assert record_of(result, out)["requests_digest"] == in_memory["requests_digest"]
    (tmp_path / "r1.requests.jsonl").write_bytes(body[: len(body) // 2])
    with pytest.raises(ResultError, match="does not belong to the record"):
        rows_of(result, out)
    with pytest.raises(ResultError, match="does not belong to the record"):
        record_of(result, out)


def test_unserialisable_record_touches_no_file(tmp_path: Path) -> None:
    result = make_result()
    result.config = {"bad": object()}
    with pytest.raises(ResultError, match="not serialisable"):
        write_run(result, tmp_path / "run.json")
    assert list(tmp_path.iterdir()) == []
