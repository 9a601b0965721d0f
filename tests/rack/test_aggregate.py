"""Rack arithmetic: the summary over node entries, stragglers, the summed series, pooled latency."""

from __future__ import annotations

from pathlib import Path

import pytest

from rackscope.rack.aggregate import MAX_RACK_BUCKETS, pooled_latency, rack_timeseries, summarize_nodes


def _entry(
    node: str,
    rate: float | None,
    *,
    status: str = "completed",
    gpus: int = 4,
    energy_j: float | None = None,
    duration_s: float = 10.0,
    started_at: float = 1000.0,
) -> dict[str, object]:
    tokens = None if rate is None else rate * duration_s
    return {
        "node": node,
        "key": node,
        "rack": "r1",
        "agent": f"http://{node}:9470",
        "status": status,
        "error": None if status == "completed" else "boom",
        "run_id": "x",
        "gpus": gpus,
        "gpu_model": "NVIDIA GB300",
        "simulated": True,
        "source": "sim",
        "started_at": started_at,
        "ended_at": started_at + duration_s,
        "duration_s": duration_s,
        "output_tokens": tokens,
        "output_tokens_per_s": rate,
        "output_tokens_per_s_per_gpu": None if rate is None else rate / gpus,
        "requests_completed": 10,
        "requests_failed": 0,
        "energy_j": energy_j,
        "power_w": None if energy_j is None else energy_j / duration_s,
        "output_tokens_per_j": None if energy_j is None or tokens is None else tokens / energy_j,
        "complete": status == "completed",
        "straggler": False,
        "fraction_of_median": None,
        "files": {},
    }


def test_rack_summary_math_and_stragglers() -> None:
    entries = [
        _entry("n01", 62_000.0, energy_j=50_000.0),
        _entry("n02", 61_000.0, energy_j=50_000.0),
        _entry("n03", 57_000.0, energy_j=40_000.0),  # 57,000 / 61,000 = 93.4 % of the median: a straggler
        _entry("n04", 60_000.0, energy_j=50_000.0),  # 98.4 %: not one
        _entry("n05", None, status="lost"),
    ]
    s = summarize_nodes(entries, threshold=0.95)
    assert s["nodes"] == 5
    assert s["nodes_completed"] == 4
    assert s["nodes_failed"] == 1
    assert s["complete"] is False
    assert s["failed_nodes"] == [{"node": "n05", "agent": "http://n05:9470", "status": "lost", "error": "boom"}]
    assert s["gpus"] == 20
    assert s["gpus_measured"] == 16
    assert s["output_tokens_per_s"] == pytest.approx(240_000.0)
    assert s["output_tokens_per_s_per_gpu"] == pytest.approx(15_000.0)
    assert s["node_output_tokens_per_s"] == {
        "count": 4,
        "min": 57_000.0,
        "median": 61_000.0 - 500.0,
        "mean": 60_000.0,
        "max": 62_000.0,
    }
    assert s["energy_j"] == pytest.approx(190_000.0)
    assert s["power_w"] == pytest.approx(19_000.0)
    assert s["output_tokens_per_j"] == pytest.approx(2_400_000.0 / 190_000.0)
    (st,) = s["stragglers"]
    assert st["node"] == "n03"
    assert st["fraction_of_median"] == pytest.approx(57_000.0 / 60_500.0)
    assert st["shortfall_tokens_per_s"] == pytest.approx(3_500.0)
    assert st["shortfall_fraction"] == pytest.approx(1 - 57_000.0 / 60_500.0)
    assert [e["straggler"] for e in entries] == [False, False, True, False, False]
    # A stricter threshold catches n04 as well, slowest first.
    s2 = summarize_nodes(
        [_entry(n, r) for n, r in (("a", 100.0), ("b", 97.0), ("c", 93.0), ("d", 99.0))], threshold=0.99
    )
    assert [x["node"] for x in s2["stragglers"]] == ["c", "b"]
    assert s2["complete"] is True


def test_rack_of_no_finished_node_is_incomplete_and_empty() -> None:
    s = summarize_nodes([_entry("n01", None, status="failed")])
    assert s["complete"] is False
    assert s["output_tokens_per_s"] == 0.0
    assert s["node_output_tokens_per_s"]["median"] is None
    assert s["energy_j"] is None
    assert s["output_tokens_per_j"] is None
    assert s["stragglers"] == []


def test_rack_timeseries_aligns_nodes_by_start() -> None:
    a = _entry("a", 10.0, started_at=100.0)
    b = _entry("b", 10.0, started_at=101.0)  # started one bucket later
    c = _entry("c", None, status="failed", started_at=100.0)
    records = {
        "a": {
            "timeseries": {
                "bucket_s": 1.0,
                "t_s": [0, 1, 2],
                "output_tokens_per_s": [1.0, 2.0, 3.0],
                "power_w": [10.0, 10.0, 10.0],
            }
        },
        "b": {
            "timeseries": {
                "bucket_s": 1.0,
                "t_s": [0, 1, 2],
                "output_tokens_per_s": [5.0, 5.0, 5.0],
                "power_w": [1.0, 2.0, 3.0],
            }
        },
        "c": {"timeseries": {"bucket_s": 1.0, "t_s": [0], "output_tokens_per_s": [99.0], "power_w": [99.0]}},
    }
    ts = rack_timeseries([a, b, c], records)
    assert ts is not None
    assert ts["t_s"] == [0.0, 1.0, 2.0, 3.0]
    assert ts["output_tokens_per_s"] == [1.0, 7.0, 8.0, 5.0]
    assert ts["power_w"] == [10.0, 11.0, 12.0, 3.0]
    assert ts["nodes"] == 2


def test_rack_timeseries_leaves_out_what_does_not_fit_its_grid() -> None:
    a = _entry("a", 10.0, started_at=100.0)
    b = _entry("b", 10.0, started_at=100.0)  # half-second buckets: another grid
    c = _entry("c", 10.0, started_at=100.0 + 2 * MAX_RACK_BUCKETS)  # a clock set years wrong
    series = {"bucket_s": 1.0, "output_tokens_per_s": [1.0, 2.0], "power_w": [5.0, 5.0]}
    records = {
        "a": {"timeseries": series},
        "b": {"timeseries": {**series, "bucket_s": 0.5}},
        "c": {"timeseries": series},
    }
    ts = rack_timeseries([a, b, c], records)
    assert ts is not None
    assert ts["nodes"] == 1
    assert ts["output_tokens_per_s"] == [1.0, 2.0]
    assert ts["power_w"] == [5.0, 5.0]


def test_pooled_latency_counts_only_finished_requests_with_numbers(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"ok": true, "ttft_s": 0.5, "tpot_s": 0.01, "e2e_s": 2.0}\n'
        '{"ok": true, "ttft_s": 1.5, "tpot_s": true, "e2e_s": "slow"}\n'
        '{"ok": false, "ttft_s": 9.0, "tpot_s": 9.0, "e2e_s": 9.0}\n'
        '{"ok": 1, "ttft_s": 9.0, "tpot_s": 9.0, "e2e_s": 9.0}\n'
    )
    pooled = pooled_latency([rows])
    assert pooled["ttft_s"]["count"] == 2
    assert pooled["ttft_s"]["max"] == 1.5
    assert pooled["tpot_s"]["count"] == 1
    assert pooled["e2e_s"]["count"] == 1
