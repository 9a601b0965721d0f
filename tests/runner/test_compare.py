"""``rackscope compare``: the verdict rule, the bootstrap intervals, the CLI and its exit codes,
and verdicts on real simulated runs (seeds, a 3 % engine slowdown, rack bundles node by node)."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rackscope.cli import main
from rackscope.runner import verdict
from rackscope.runner.compare import JUDGED, METRICS, compare, render
from rackscope.runner.measured import Window
from rackscope.runner.results.stats import percentile
from rackscope.runner.verdict import Buckets, QuantileSampler, RateSampler, change_interval, decide
from tests.helpers import rackscope_command
from tests.rack.agents import running_agents, sim_agent_args

LAT = {"count": 100, "mean": 0.2, "min": 0.1, "max": 0.5, "p50": 0.2, "p90": 0.3, "p95": 0.32, "p99": 0.4,
       "p999": 0.45}


def record(schema: str = "rackscope.run/1", **summary: Any) -> dict[str, Any]:
    """A record with a summary only (no series, no rows): judged on its point values."""
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


def compare_cli(*args: str) -> tuple[int, str, str]:
    done = subprocess.run(rackscope_command("compare", *args), capture_output=True, text=True, timeout=120,
                          check=False)
    return done.returncode, done.stdout, done.stderr


def by_label(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in rows}


# --- the verdict rule and the interval -----------------------------------------------------------
@pytest.mark.parametrize(("low", "high", "better", "expected"), [
    (-0.05, -0.03, "higher", "regression"),  # all of it below -2 %
    (-0.05, -0.01, "higher", "inconclusive"),  # could be -1 %: not sure it is beyond
    (-0.01, 0.015, "higher", "no change"),
    (-0.02, 0.02, "higher", "no change"),  # the threshold itself counts as within
    (-0.03, 0.01, "higher", "inconclusive"),
    (0.025, 0.04, "higher", "improvement"),
    (0.03, 0.05, "lower", "regression"),  # latency up
    (-0.05, -0.03, "lower", "improvement"),
    (-0.04, 0.04, "lower", "inconclusive"),
])
def test_verdict_rule(low: float, high: float, better: verdict.Direction, expected: str) -> None:
    assert decide(low, high, 0.02, better) == expected


def test_exit_codes_from_verdicts() -> None:
    assert verdict.exit_code(["no change", "improvement", "info"]) == verdict.EXIT_OK == 0
    assert verdict.exit_code(["no change", "inconclusive"]) == verdict.EXIT_OK
    assert verdict.exit_code(["inconclusive"], fail_inconclusive=True) == verdict.EXIT_INCONCLUSIVE == 3
    assert verdict.exit_code(["inconclusive", "regression"], fail_inconclusive=True) == verdict.EXIT_REGRESSION == 1


def test_t_quantiles_match_the_tables() -> None:
    # Student's t, two-sided 95 %, from any statistics table.
    for df, table in ((1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (120, 1.980)):
        assert verdict.t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)
    assert verdict.widening(10_000, 0.95) == pytest.approx(1.0, abs=1e-3)
    assert verdict.widening(3, 0.95) > verdict.widening(10, 0.95) > verdict.widening(100, 0.95) > 1.0


def test_block_length_grows_with_the_cube_root_and_caps_the_blocks() -> None:
    assert [verdict.block_length(n) for n in (1, 8, 27, 1000)] == [1, 2, 3, 10]
    assert math.ceil(1_000_000 / verdict.block_length(1_000_000)) <= verdict.MAX_BLOCKS


def _noisy_buckets(rng: random.Random, rate: float, n: int, noise: float) -> Buckets:
    tokens = [rate * (1.0 + rng.gauss(0.0, noise)) for _ in range(n)]
    return Buckets(tokens, [1.0] * n, [t / 4.0 for t in tokens])


def test_rate_interval_covers_the_true_change() -> None:
    """Over many pairs of simulated sides with a known 3 % drop, the 95 % interval holds -3 %
    about 95 % of the time, and a side compared with itself centres on zero."""
    rng = random.Random(7)
    covered = 0
    trials = 40
    for i in range(trials):
        base = RateSampler([[_noisy_buckets(rng, 1000.0, 60, 0.02)]])
        new = RateSampler([[_noisy_buckets(rng, 970.0, 60, 0.02)]])
        b_point, n_point = base.point()[0], new.point()[0]
        b_reps, _ = base.replicates(random.Random(f"b{i}"), 400)
        n_reps, _ = new.replicates(random.Random(f"n{i}"), 400)
        interval = change_interval(b_point, n_point, b_reps, n_reps, min(base.units, new.units), 0.95)
        assert interval is not None
        expected = 970.0 / 1000.0 - 1.0
        covered += interval.low <= expected <= interval.high
    assert covered >= trials * 0.85


def test_runs_as_blocks_widen_the_interval_by_the_run_to_run_spread() -> None:
    rng = random.Random(3)
    steady = [[_noisy_buckets(rng, 1000.0, 30, 0.01)] for _ in range(2)]
    # Same within-run noise, but the two runs sit 4 % apart.
    spread = [[_noisy_buckets(rng, 980.0, 30, 0.01)], [_noisy_buckets(rng, 1020.0, 30, 0.01)]]

    def width(runs: list[list[Buckets]]) -> float:
        sampler = RateSampler(runs)
        reps, _ = sampler.replicates(random.Random(1), 500)
        return percentile(sorted(reps), 97.5) - percentile(sorted(reps), 2.5)

    assert width(spread) > 3 * width(steady)


def test_quantile_window_gives_the_same_replicates_as_a_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11)
    two_runs = [[[rng.lognormvariate(mu, 0.5) for _ in range(n)]] for mu, n in ((0.0, 900), (0.1, 700))]
    one_run = [[[rng.lognormvariate(0.0, 0.5) for _ in range(1600)]]]
    for runs in (two_runs, one_run):
        fast = QuantileSampler(runs, (0.5, 0.99))
        fast_reps = fast.replicates(random.Random(5), 300)
        assert fast.fallbacks <= 3  # the window almost always holds the percentile
        pooled = sorted(v for run in runs for s in run for v in s)
        assert fast.point() == [percentile(pooled, 50.0), percentile(pooled, 99.0)]
    monkeypatch.setattr(verdict, "WINDOW_SDS", 0.0)
    narrow = QuantileSampler(one_run, (0.5, 0.99))
    narrow_reps = narrow.replicates(random.Random(5), 300)
    assert narrow.fallbacks > 100  # many replicates missed the narrow window and were sorted in full...
    assert narrow_reps == fast_reps  # ...and every replicate came out the same


def test_too_few_requests_for_p99_is_inconclusive_not_guessed() -> None:
    rows = [{"ok": True, "start_s": i * 0.1, "ttft_s": 0.1 + (i % 7) * 0.01, "tpot_s": 0.02} for i in range(60)]
    summary = record()["summary"]
    window = Window(summary, [], [rows])
    from rackscope.runner.compare import Options, compare_windows

    got = {r.metric.key: r for r in compare_windows([window], [window], Options(threshold_pct=2.0), JUDGED)}
    assert got["ttft_s.p99"].verdict == "inconclusive"
    assert "too few finished requests for p99" in got["ttft_s.p99"].note
    assert got["ttft_s.p50"].basis == "bootstrap"


# --- summaries alone: point verdicts (records without series or rows) ------------------------------
def test_identical_summaries_have_no_regression() -> None:
    rows = compare(record(), record())
    assert rows
    assert not any(r.regressed for r in rows)
    assert {r.metric.key for r in rows} >= {"output_tokens_per_s", "output_tokens_per_j", "ttft_s.p99"}


def test_point_verdicts_without_samples() -> None:
    v = verdicts(record(), record(output_tokens_per_s=470.0))  # -6 %
    assert v["output_tokens_per_s"] == "regression"
    assert verdicts(record(), record(output_tokens_per_s=480.0))["output_tokens_per_s"] == "no change"
    assert verdicts(record(), record(output_tokens_per_s=600.0))["output_tokens_per_s"] == "improvement"
    v = verdicts(record(), record(ttft_s=dict(LAT, p99=0.5), output_tokens_per_j=4.0))
    assert v["ttft_s.p99"] == "regression"
    assert v["output_tokens_per_j"] == "regression"
    assert v["ttft_s.p90"] == "info"  # shown, not judged


def test_flags_and_informational_metrics() -> None:
    assert verdicts(record(valid=True), record(valid=False))["valid"] == "regression"
    assert verdicts(record(), record(complete=False))["complete"] == "regression"
    v = verdicts(record(), record(average_power_w=150.0, requests_failed=7))
    assert v["average_power_w"] == "info"
    assert v["requests_failed"] == "info"


def test_missing_metrics_are_skipped_or_marked() -> None:
    new = record()
    del new["summary"]["output_tokens_per_j"]
    rows = {r.metric.key: r for r in compare(record(), new)}
    assert rows["output_tokens_per_j"].verdict == "n/a"
    assert "goodput_requests_per_s" not in rows


def test_metric_list_is_data() -> None:
    keys = [m.key for m in METRICS]
    assert len(keys) == len(set(keys))
    assert {m.key for m in JUDGED} == {"output_tokens_per_s", "output_tokens_per_j", "ttft_s.p50", "ttft_s.p99",
                                       "tpot_s.p50", "tpot_s.p99"}
    assert all(m.better != "info" for m in JUDGED)


def test_table_has_columns_and_conclusion() -> None:
    text = render(compare(record(), record(output_tokens_per_s=400.0)), "base.json", "new.json", 5.0)
    assert text.splitlines()[0].split() == ["metric", "base.json", "new.json", "change", "%", "95%", "CI", "verdict"]
    line = next(x for x in text.splitlines() if x.startswith("output tokens/s "))
    assert line.split()[2:] == ["500.0", "400.0", "-20.0", "-", "regression", "(point)"]
    assert "REGRESSION beyond 5%: output tokens/s" in text
    assert "400.00" in next(x for x in text.splitlines() if x.startswith("TTFT p99 (ms)"))  # seconds as ms


# --- the command ---------------------------------------------------------------------------------
def test_cli_exit_codes_and_forms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write(tmp_path, "base.json", record())
    same = write(tmp_path, "same.json", record(output_tokens_per_s=490.0))
    worse = write(tmp_path, "worse.json", record(output_tokens_per_s=400.0))
    assert main(["compare", base, same, "--threshold", "5"]) == 0
    assert "no regression beyond 5%" in capsys.readouterr().out
    assert main(["compare", base, worse, "--threshold", "5"]) == 1
    assert "REGRESSION beyond 5%" in capsys.readouterr().out
    assert main(["compare", base, worse, "--threshold", "25"]) == 0
    assert main(["compare", "--base", base, same, "--new", worse, "--threshold", "5"]) == 1
    capsys.readouterr()
    assert main(["compare", base, worse, "--format", "json"]) == 1
    rows = by_label(json.loads(capsys.readouterr().out))
    assert rows["output tokens/s"]["verdict"] == "regression"
    assert rows["output tokens/s"]["basis"] == "point"
    for bad in (["compare", base], ["compare", base, same, "--base", base, "--new", same],
                ["compare", "--base", base], ["compare", base, same, "--confidence", "120"]):
        assert main(bad) == 2
        assert "rackscope compare: error:" in capsys.readouterr().err


def test_cli_unreadable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write(tmp_path, "base.json", record())
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert main(["compare", base, str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["compare", base, str(tmp_path / "missing.json")]) == 2
    assert main(["compare", write(tmp_path, "other.json", {"schema": "something/1", "summary": {}}), base]) == 2
    rack = write(tmp_path, "rack.json", record(schema="rackscope.rack/1"))
    assert main(["compare", base, rack]) == 2
    assert "cannot compare run records with rack records" in capsys.readouterr().err


def test_rack_summaries_compare(tmp_path: Path) -> None:
    rack = record(schema="rackscope.rack/1")
    worse = copy.deepcopy(rack)
    worse["summary"]["output_tokens_per_s"] = 100.0
    assert main(["compare", write(tmp_path, "a.json", rack), write(tmp_path, "b.json", worse)]) == 1


# --- real simulated runs ---------------------------------------------------------------------------
def sim_run(out: Path, seed: int) -> str:
    """A real `rackscope run --engine sim` on a virtual clock: 30 simulated seconds of an H100
    at 64 requests in flight, short lognormal outputs so a thousand requests finish."""
    subprocess.run(rackscope_command(
        "run", "--engine", "sim", "--gpu-model", "h100", "--gpus", "1", "--scenario", "concurrency",
        "--concurrency", "64", "--output-len", "64", "--length-dist", "lognormal", "--warmup", "2s",
        "--duration", "30", "--warm-start", "--virtual-clock", "--seed", str(seed), "--output", str(out),
    ), check=True, capture_output=True, timeout=120)  # fmt: skip
    return str(out)


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("seeds")
    return [sim_run(tmp / f"seed{seed}.json", seed) for seed in (1, 2, 3, 4)]


@pytest.mark.slow
def test_runs_differing_only_by_seed_show_no_change_at_2_percent(seeded_runs: list[str]) -> None:
    code, out, err = compare_cli(seeded_runs[0], seeded_runs[1], "--threshold", "2", "--format", "json")
    assert code == 0, err
    rows = by_label(json.loads(out))
    for label in ("output tokens/s", "output tokens/J", "TPOT p50 (ms)", "TPOT p99 (ms)"):
        assert rows[label]["verdict"] == "no change", rows[label]
        assert rows[label]["basis"] == "bootstrap"
        assert -2.0 <= rows[label]["ci_low_pct"] <= rows[label]["change_pct"] <= rows[label]["ci_high_pct"] <= 2.0
    assert all(r["verdict"] != "regression" for r in rows.values())
    # The table says the same, and the same seed gives the same intervals.
    code, table, _ = compare_cli(seeded_runs[0], seeded_runs[1], "--threshold", "2")
    assert code == 0
    assert "no regression beyond 2%" in table
    assert compare_cli(seeded_runs[0], seeded_runs[1], "--threshold", "2")[1] == table


@pytest.mark.slow
def test_several_runs_per_side(seeded_runs: list[str]) -> None:
    code, out, err = compare_cli("--base", *seeded_runs[:2], "--new", *seeded_runs[2:], "--threshold", "2",
                                 "--format", "json")
    assert code == 0, err
    rows = by_label(json.loads(out))
    assert rows["output tokens/s"]["verdict"] == "no change"
    single = by_label(json.loads(compare_cli(seeded_runs[0], seeded_runs[2], "--threshold", "2", "--format",
                                             "json")[1]))
    # Two runs a side: the mean moves less than one run does, and the interval carries the spread.
    assert rows["output tokens/s"]["base"] == pytest.approx(
        (json.loads(Path(seeded_runs[0]).read_text())["summary"]["output_tokens_per_s"]
         + json.loads(Path(seeded_runs[1]).read_text())["summary"]["output_tokens_per_s"]) / 2)
    assert single["output tokens/s"]["ci_low_pct"] is not None
    code, _, _ = compare_cli("--base", *seeded_runs[:2], "--new", *seeded_runs[2:], "--threshold", "0.01",
                             "--fail-inconclusive")
    assert code == verdict.EXIT_INCONCLUSIVE  # a 0.01 % question the data cannot answer


def _post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - a test agent on 127.0.0.1
        pass


def rack_run(urls: list[str], out: Path) -> Path:
    """10 measured seconds at 64 requests in flight per node, MLPerf-like lognormal output lengths."""
    subprocess.run(
        [sys.executable, "-m", "rackscope", "rack", "run", "--agents", ",".join(urls), "--scenario", "concurrency",
         "--concurrency", "64", "--length-dist", "lognormal", "--warmup", "2s",
         "--duration", "10", "--output", str(out), "--poll-interval", "0.2"],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    return out / "rack.json"


@pytest.fixture(scope="module")
def slowdown_bundles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """Two real agents (n01, n02); a rack run, then `engine-slow=1.03` injected into n02 through
    its API, then the same rack run again."""
    tmp = tmp_path_factory.mktemp("slowdown")
    extra = ("--gpus", "1", "--gpu-model", "h100", "--rack", "lab")
    with running_agents(sim_agent_args(node, tmp, extra=extra) for node in ("n01", "n02")) as agents:
        urls = [a.url for a in agents]
        base = rack_run(urls, tmp / "base")
        _post(f"{agents[1].url}/v1/faults", {"fault": "engine-slow", "value": 1.03})
        yield base, rack_run(urls, tmp / "slow")


def node_record(rack_json: Path, node: str) -> str:
    entry = next(n for n in json.loads(rack_json.read_text())["nodes"] if n["node"] == node)
    return str(rack_json.parent / entry["files"]["record"])


@pytest.mark.slow
def test_a_3_percent_engine_slowdown_is_a_regression(slowdown_bundles: tuple[Path, Path]) -> None:
    base, slow = slowdown_bundles
    code, out, err = compare_cli(node_record(base, "n02"), node_record(slow, "n02"), "--threshold", "2",
                                 "--format", "json")
    assert code == 1, err
    rows = by_label(json.loads(out))
    for label in ("output tokens/s", "output tokens/J"):
        assert rows[label]["verdict"] == "regression", rows[label]
        assert rows[label]["ci_high_pct"] < -2.0
    assert rows["TPOT p50 (ms)"]["verdict"] == "regression"
    assert rows["TPOT p50 (ms)"]["ci_low_pct"] > 2.0
    # The untouched node ran the same workload twice: no change.
    code, out, err = compare_cli(node_record(base, "n01"), node_record(slow, "n01"), "--threshold", "2",
                                 "--format", "json")
    assert code == 0, err
    assert by_label(json.loads(out))["output tokens/s"]["verdict"] == "no change"


@pytest.mark.slow
def test_rack_bundles_compare_node_by_node_and_name_the_node_that_moved(
    slowdown_bundles: tuple[Path, Path],
) -> None:
    base, slow = slowdown_bundles
    code, out, err = compare_cli(str(base), str(slow), "--threshold", "2", "--format", "json")
    assert code == 1, err
    rows = json.loads(out)
    nodes = {(r["node"], r["metric"]): r for r in rows if r["node"]}
    assert nodes[("n02", "output_tokens_per_s")]["verdict"] == "regression"
    assert nodes[("n01", "output_tokens_per_s")]["verdict"] == "no change"
    whole = {r["metric"]: r for r in rows if r["node"] is None}
    # The rack total moved by about half of n02's share: neither side of 2 % for sure.
    assert whole["output_tokens_per_s"]["verdict"] != "regression"
    assert whole["output_tokens_per_s"]["change_pct"] == pytest.approx(
        (json.loads(slow.read_text())["summary"]["output_tokens_per_s"]
         / json.loads(base.read_text())["summary"]["output_tokens_per_s"] - 1) * 100)
    code, table, _ = compare_cli(str(base), str(slow), "--threshold", "2")
    assert code == 1
    assert "nodes that moved: n02" in table
    assert table.splitlines()[0].split()[1:3] == ["base/rack.json", "slow/rack.json"]  # same file names
    assert "[n02] output tokens/s" in table


@pytest.mark.slow
def test_rack_records_without_their_node_records(slowdown_bundles: tuple[Path, Path], tmp_path: Path) -> None:
    """rack.json alone: the rack's own summed series carries the whole comparison; a node path
    that leaves the bundle is not followed."""
    base, slow = slowdown_bundles
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(base, alone / "rack.json")
    escaping = json.loads(slow.read_text())
    for node in escaping["nodes"]:
        node["files"]["record"] = "../" + node["files"]["record"]
    (tmp_path / "escaping.json").write_text(json.dumps(escaping))
    code, out, err = compare_cli(str(alone / "rack.json"), str(tmp_path / "escaping.json"), "--threshold", "2")
    assert code in (0, 1), err
    assert "its run record is not in the bundle" in out
    assert "[n02]" not in out
    rows = by_label(json.loads(compare_cli(str(alone / "rack.json"), str(tmp_path / "escaping.json"),
                                           "--threshold", "2", "--format", "json")[1]))
    assert rows["output tokens/s"]["basis"] == "bootstrap"
    assert rows["TPOT p50 (ms)"]["basis"] in ("point", "")  # no rows without the node records


def sweep_run(out: Path, seed: int) -> str:
    subprocess.run(rackscope_command(
        "run", "--engine", "sim", "--gpu-model", "h100", "--gpus", "1", "--scenario", "sweep", "--sweep", "8,32",
        "--output-len", "64", "--length-dist", "lognormal", "--duration", "30", "--warmup", "1s", "--virtual-clock",
        "--seed", str(seed), "--output", str(out),
    ), check=True, capture_output=True, timeout=120)  # fmt: skip
    return str(out)


@pytest.mark.slow
def test_sweeps_are_judged_point_by_point(tmp_path: Path) -> None:
    runs = [sweep_run(tmp_path / f"sweep{seed}.json", seed) for seed in (1, 2)]
    code, out, err = compare_cli(*runs, "--threshold", "5", "--format", "json")
    assert code == 0, err
    rows = by_label(json.loads(out))
    assert rows["output tokens/s"]["verdict"] == "info"  # the whole run mixes two load levels
    for point in ("concurrency=8", "concurrency=32"):
        row = rows[f"[{point}] output tokens/s"]
        assert row["basis"] == "bootstrap"
        assert row["ci_low_pct"] <= row["change_pct"] <= row["ci_high_pct"]
        assert row["verdict"] in ("no change", "inconclusive")
    record = json.loads(Path(runs[0]).read_text())
    assert rows["[concurrency=32] output tokens/s"]["base"] == pytest.approx(
        record["points"][1]["summary"]["output_tokens_per_s"])
