"""``rackscope compare``: verdicts per metric direction, the table, exit codes 0 / 1 / 2."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from rackscope.cli import main
from rackscope.runner.compare import METRICS, compare, render

LAT = {"count": 100, "mean": 0.2, "min": 0.1, "max": 0.5, "p50": 0.2, "p90": 0.3, "p95": 0.32, "p99": 0.4,
       "p999": 0.45}


def record(schema: str = "rackscope.run/1", **summary: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "complete": True, "requests_completed": 100, "requests_failed": 0, "input_tokens": 1000,
        "output_tokens": 5000, "duration_s": 10.0, "output_tokens_per_s": 500.0, "output_tokens_per_s_per_gpu": 125.0,
        "requests_per_s": 10.0, "energy_j": 1000.0, "average_power_w": 100.0, "output_tokens_per_j": 5.0,
        "ttft_s": dict(LAT), "tpot_s": dict(LAT), "itl_s": dict(LAT), "e2e_s": dict(LAT),
    }
    s.update(summary)
    return {"schema": schema, "config": {}, "environment": {}, "summary": s, "points": []}


def write(tmp_path: Path, name: str, rec: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(rec))
    return str(path)


def verdicts(base: dict[str, Any], new: dict[str, Any], threshold: float = 5.0) -> dict[str, str]:
    return {r.metric.key: r.verdict for r in compare(base, new, threshold)}


def test_identical_records_have_no_regression() -> None:
    rows = compare(record(), record())
    assert rows
    assert not any(r.regressed for r in rows)
    assert {r.metric.key for r in rows} >= {"output_tokens_per_s", "output_tokens_per_j", "ttft_s.p99"}


def test_throughput_down_beyond_threshold_regresses() -> None:
    v = verdicts(record(), record(output_tokens_per_s=470.0))  # -6 %
    assert v["output_tokens_per_s"] == "REGRESSED"
    v = verdicts(record(), record(output_tokens_per_s=480.0))  # -4 %
    assert v["output_tokens_per_s"] == "ok"
    v = verdicts(record(), record(output_tokens_per_s=600.0))  # +20 %
    assert v["output_tokens_per_s"] == "better"


def test_latency_up_and_tokens_per_joule_down_regress() -> None:
    slow = dict(LAT, p99=0.5)  # +25 %
    v = verdicts(record(), record(ttft_s=slow, output_tokens_per_j=4.0))
    assert v["ttft_s.p99"] == "REGRESSED"
    assert v["ttft_s.p50"] == "ok"
    assert v["output_tokens_per_j"] == "REGRESSED"
    faster = dict(LAT, p99=0.3)
    assert verdicts(record(), record(ttft_s=faster))["ttft_s.p99"] == "better"


def test_flags_and_informational_metrics() -> None:
    v = verdicts(record(valid=True), record(valid=False))
    assert v["valid"] == "REGRESSED"
    v = verdicts(record(), record(complete=False))
    assert v["complete"] == "REGRESSED"
    v = verdicts(record(), record(average_power_w=150.0, requests_failed=7))
    assert v["average_power_w"] == "info"
    assert v["requests_failed"] == "info"


def test_missing_metrics_are_skipped_or_marked() -> None:
    base = record()
    new = record()
    del new["summary"]["output_tokens_per_j"]
    rows = {r.metric.key: r for r in compare(base, new)}
    assert rows["output_tokens_per_j"].verdict == "n/a"
    assert "goodput_requests_per_s" not in rows  # in neither record
    none_energy = record(output_tokens_per_j=None)
    assert verdicts(none_energy, none_energy).get("output_tokens_per_j") is None


def test_sweep_points_compared_by_value() -> None:
    base, new = record(), record()
    base["points"] = [{"point": {"concurrency": 8}, "summary": {"output_tokens_per_s": 100.0}},
                      {"point": {"concurrency": 64}, "summary": {"output_tokens_per_s": 400.0}}]
    new["points"] = [{"point": {"concurrency": 64}, "summary": {"output_tokens_per_s": 300.0}}]
    rows = [r for r in compare(base, new) if r.label.startswith("[")]
    assert [(r.label, r.verdict) for r in rows] == [("[concurrency=64] output tokens/s", "REGRESSED")]


def test_table_has_columns_and_conclusion() -> None:
    text = render(compare(record(), record(output_tokens_per_s=400.0)), "base.json", "new.json", 5.0)
    header = text.splitlines()[0].split()
    assert header == ["metric", "base.json", "new.json", "change", "%", "verdict"]
    line = next(x for x in text.splitlines() if x.startswith("output tokens/s "))
    assert line.split()[-4:] == ["500.0", "400.0", "-20.0", "REGRESSED"]
    assert "REGRESSION beyond 5%: output tokens/s" in text
    ttft = next(x for x in text.splitlines() if x.startswith("TTFT p99 (ms)"))
    assert "400.00" in ttft  # seconds shown as milliseconds


def test_metric_list_is_data() -> None:
    keys = [m.key for m in METRICS]
    assert len(keys) == len(set(keys))
    assert all(m.better in ("higher", "lower", "info") for m in METRICS)


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write(tmp_path, "base.json", record())
    same = write(tmp_path, "same.json", record(output_tokens_per_s=490.0))
    worse = write(tmp_path, "worse.json", record(output_tokens_per_s=400.0))
    assert main(["compare", base, same, "--threshold", "5"]) == 0
    assert "no regression beyond 5%" in capsys.readouterr().out
    assert main(["compare", base, worse, "--threshold", "5"]) == 1
    assert "REGRESSED" in capsys.readouterr().out
    assert main(["compare", base, worse, "--threshold", "25"]) == 0
    capsys.readouterr()
    assert main(["compare", base, worse, "--format", "json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert {"metric": "output_tokens_per_s", "verdict": "REGRESSED"}.items() <= next(
        r for r in rows if r["metric"] == "output_tokens_per_s"
    ).items()


def test_cli_unreadable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write(tmp_path, "base.json", record())
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert main(["compare", base, str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["compare", base, str(tmp_path / "missing.json")]) == 2
    other = write(tmp_path, "other.json", {"schema": "something/1", "summary": {}})
    assert main(["compare", other, base]) == 2


def test_rack_records_with_matching_keys_compare(tmp_path: Path) -> None:
    rack = record(schema="rackscope.rack/1")
    worse = copy.deepcopy(rack)
    worse["summary"]["output_tokens_per_s"] = 100.0
    assert main(["compare", write(tmp_path, "a.json", rack), write(tmp_path, "b.json", worse)]) == 1
