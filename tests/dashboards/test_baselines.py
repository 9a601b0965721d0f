"""``rackscope baseline set|show``: baselines from real records, the rule file Prometheus reads
(promtool check and test, the regression alert against the measured value), the regenerated
PrometheusRule, refusal of partial records and of files it does not understand, and two
concurrent sets keeping both."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rackscope.cli import main
from rackscope.dashboards import baselines, build, names, rules
from tests.helpers import rackscope_command

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = "/usr/bin/promtool"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool" / "rules_test.yml"
PROMETHEUS_RULE = f"{build.K8S_GENERATED_DIR}/prometheusrule.yaml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], check=False, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A source tree holding the committed rules and baselines (deploy/ for the PrometheusRule)."""
    root = tmp_path / "tree"
    (root / "deploy").mkdir(parents=True)
    shutil.copytree(ROOT / build.RULES_DIR, root / build.RULES_DIR)
    return root


@pytest.fixture(scope="module")
def run_record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real record: `rackscope run --engine sim` (virtual clock) of rack `lab`."""
    out = tmp_path_factory.mktemp("record") / "lab-run.json"
    subprocess.run(rackscope_command(
        "run", "--engine", "sim", "--gpu-model", "h100", "--gpus", "2", "--scenario", "concurrency",
        "--concurrency", "64", "--duration", "20", "--warmup", "2s", "--warm-start", "--virtual-clock",
        "--rack", "lab", "--node", "n01", "--output", str(out),
    ), check=True, capture_output=True, timeout=120)  # fmt: skip
    return out


def rules_of(path: Path) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def test_committed_file_is_in_the_written_format() -> None:
    path = baselines.baselines_path(ROOT)
    assert baselines.render(baselines.read(path)) == path.read_text()


def test_set_from_a_run_record_then_show(tree: Path, run_record: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = json.loads(run_record.read_text())["summary"]
    record = json.loads(run_record.read_text())
    assert main(["baseline", "set", str(run_record), "--root", str(tree)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {build.RULES_DIR}/{rules.BASELINES_FILE}" in out
    assert f"wrote {PROMETHEUS_RULE}" in out

    written = rules_of(baselines.baselines_path(tree))
    lab = {r["record"]: r for r in written if r["labels"]["rack"] == "lab"}
    assert float(lab[names.RACK_BASELINE_TPS]["expr"][7:-1]) == pytest.approx(summary["output_tokens_per_s"], abs=0.05)
    assert float(lab[names.RACK_BASELINE_TPJ]["expr"][7:-1]) == pytest.approx(summary["output_tokens_per_j"],
                                                                              abs=5e-5)
    assert lab[names.RACK_BASELINE_TPS]["labels"] == {
        "rack": "lab", "baseline_source": f"{run_record.parent.name}/{run_record.name}",
        "baseline_run_id": record["run_id"], "baseline_measured_at": record["ended_at"],
    }
    # The hand-entered r1 is kept as it was.
    r1 = {r["record"]: r["expr"] for r in written if r["labels"]["rack"] == "r1"}
    assert r1 == {names.RACK_BASELINE_TPS: "vector(1100948)", names.RACK_BASELINE_TPJ: "vector(11)"}
    # No temporary file left beside it.
    assert sorted(p.name for p in baselines.baselines_path(tree).parent.iterdir()) == [
        rules.BASELINES_FILE, rules.RULES_FILE]

    # The PrometheusRule is what `rackscope dashboards build` would write, and carries the new rules.
    rule_text = (tree / PROMETHEUS_RULE).read_text()
    assert rule_text == build.render(tree, with_dashboards=False)[PROMETHEUS_RULE]
    groups = yaml.safe_load(rule_text)["spec"]["groups"]
    k8s = [r for g in groups if g["name"] == baselines.GROUP_NAME for r in g["rules"]]
    assert k8s == written

    assert main(["baseline", "show", "--root", str(tree)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rack", "output", "tokens/s", "tokens/J", "source", "run", "measured"]
    line = next(x.split() for x in table if x.startswith("lab "))
    assert line[1] == f"{summary['output_tokens_per_s']:,.1f}"
    assert line[3:] == [f"{run_record.parent.name}/{run_record.name}", record["run_id"], record["ended_at"]]
    assert any(x.startswith("r1 ") and "(entered by hand)" in x for x in table)
    assert main(["baseline", "show", "--root", str(tree), "--format", "json"]) == 0
    shown = {b["rack"]: b for b in json.loads(capsys.readouterr().out)}
    assert shown["lab"]["run_id"] == record["run_id"]
    assert shown["r1"]["source"] is None

    # Setting it again from the same record changes nothing.
    assert main(["baseline", "set", str(run_record), "--root", str(tree)]) == 0
    assert "baselines unchanged" in capsys.readouterr().out


def _with_rule_files(test_file: Path, tree: Path, out: Path) -> Path:
    """The committed promtool tests against the tree's rule files. Their case listing every
    baseline series expects r1's alone; with a rack added it asks for r1's by name."""
    doc = yaml.safe_load(test_file.read_text())
    doc["rule_files"] = [str(tree / build.RULES_DIR / rules.RULES_FILE), str(baselines.baselines_path(tree))]
    for test in doc["tests"]:
        for case in test.get("promql_expr_test", []):
            if case["expr"] in (names.RACK_BASELINE_TPS, names.RACK_BASELINE_TPJ):
                case["expr"] += '{rack="r1"}'
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def _alert_case(tree: Path, rack: str, before: float, after: float, fires: bool) -> dict[str, Any]:
    """The throughput-regression alert for ``rack``: its output rate steps from ``before`` to
    ``after`` tokens/s after 10 minutes of 15 s samples, while a run is active."""
    alert = next(r for r in rules_of(tree / build.RULES_DIR / rules.RULES_FILE)
                 if r.get("alert") == "RackscopeRackThroughputRegression")
    step_before, step_after = before * 15, after * 15
    tokens = f"0+{step_before:.6f}x40 {step_before * 40 + step_after:.6f}+{step_after:.6f}x39"
    expected = [] if not fires else [{
        "exp_labels": {"severity": alert["labels"]["severity"], "rack": rack},
        "exp_annotations": {k: v.replace("{{ $labels.rack }}", rack) for k, v in alert["annotations"].items()},
    }]
    return {
        "interval": "15s",
        "input_series": [
            {"series": f'{names.TOKENS}{{rack="{rack}",node="n1",gpu="0",model="m",engine="sim",'
                       f'gen_ai_token_type="output"}}', "values": tokens},
            {"series": f'{names.RUN_INFO}{{rack="{rack}",node="n1",run_id="a",scenario="offline",model="m",'
                       'engine="sim"}', "values": "1+0x80"},
        ],
        "alert_rule_test": [{"alertname": "RackscopeRackThroughputRegression", "eval_time": "17m",
                             "exp_alerts": expected}],
    }


@pytest.mark.slow
def test_written_rules_pass_promtool_and_the_alert_reads_the_measured_baseline(
    tree: Path, run_record: Path, tmp_path: Path,
) -> None:
    assert main(["baseline", "set", str(run_record), "--root", str(tree)]) == 0
    files = [str(tree / build.RULES_DIR / rules.RULES_FILE), str(baselines.baselines_path(tree))]
    checked = promtool("check", "rules", *files)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("SUCCESS") == 2

    # Every existing promtool case still passes against the written file.
    result = promtool("test", "rules", str(_with_rule_files(PROMTOOL_TESTS, tree, tmp_path / "existing.yml")))
    assert result.returncode == 0, result.stdout + result.stderr

    # The alert compares rack `lab` with the measured value: half of it fires; 95 % of it (below the
    # recent maximum, above 90 % of the baseline) does not; the recorded series is the baseline.
    measured = next(b for b in baselines.read(baselines.baselines_path(tree)) if b.rack == "lab")
    labels = ",".join(f'{k}="{v}"' for k, v in {"rack": "lab", **measured.provenance()}.items())
    doc = {
        "rule_files": files,
        "evaluation_interval": "15s",
        "tests": [
            _alert_case(tree, "lab", measured.tokens_per_s, measured.tokens_per_s * 0.5, fires=True),
            _alert_case(tree, "lab", measured.tokens_per_s * 1.2, measured.tokens_per_s * 0.95, fires=False),
            {"interval": "15s", "input_series": [], "promql_expr_test": [{
                "expr": f"round({names.RACK_BASELINE_TPS} * 10)", "eval_time": "1m",
                "exp_samples": [{"labels": f"{{{labels}}}", "value": round(measured.tokens_per_s * 10)},
                                {"labels": '{rack="r1"}', "value": 11009480}],
            }]},
        ],
    }
    path = tmp_path / "lab_test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_partial_records_are_refused_unless_allowed(
    tree: Path, run_record: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    partial = tmp_path / "partial.json"
    record = json.loads(run_record.read_text())
    record["summary"].update(complete=False, stop_reason="cancelled")
    record["requests_file"] = None  # its rows stay with the complete record
    record["requests_digest"] = None
    partial.write_text(json.dumps(record))
    before = baselines.baselines_path(tree).read_text()
    assert main(["baseline", "set", str(partial), "--root", str(tree)]) == 2
    err = capsys.readouterr().err
    assert "incomplete record (cancelled)" in err
    assert "--allow-partial" in err
    assert baselines.baselines_path(tree).read_text() == before
    assert not (tree / PROMETHEUS_RULE).exists()
    assert main(["baseline", "set", str(partial), "--root", str(tree), "--allow-partial", "--rack", "lab9"]) == 0
    assert "lab9" in {b.rack for b in baselines.read(baselines.baselines_path(tree))}


def test_a_file_it_does_not_understand_is_left_alone(
    tree: Path, run_record: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = baselines.baselines_path(tree)
    edited = path.read_text().replace("vector(11)", "vector(11) * 2")
    path.write_text(edited)
    assert main(["baseline", "set", str(run_record), "--root", str(tree)]) == 2
    assert "is not vector(NUMBER)" in capsys.readouterr().err
    assert path.read_text() == edited
    assert main(["baseline", "show", "--root", str(tree)]) == 2
    assert main(["baseline", "set", str(run_record), "--root", str(tree.parent)]) == 2  # not a source tree
    assert "not a rackscope source tree" in capsys.readouterr().err
    bad_rack = ["baseline", "set", str(run_record), "--root", str(tree), "--rack", "lab one"]
    assert main(bad_rack) == 2


@pytest.mark.slow
def test_two_concurrent_sets_keep_both(tree: Path, run_record: Path) -> None:
    procs = [subprocess.Popen(  # noqa: S603 - the test's own command
        [sys.executable, "-m", "rackscope", "baseline", "set", str(run_record), "--rack", rack, "--root", str(tree)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) for rack in ("rack-a", "rack-b", "rack-c")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert {b.rack for b in baselines.read(baselines.baselines_path(tree))} >= {"rack-a", "rack-b", "rack-c", "r1"}
    assert (tree / PROMETHEUS_RULE).read_text() == build.render(tree, with_dashboards=False)[PROMETHEUS_RULE]


@pytest.mark.slow
def test_set_from_a_rack_bundle(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    subprocess.run(rackscope_command(
        "demo", "--nodes", "2", "--gpus-per-node", "1", "--gpu-model", "h100", "--duration", "3", "--rack", "bay7",
        "--no-tui", "--output", str(bundle),
    ), check=True, capture_output=True, timeout=180)  # fmt: skip
    rack = json.loads((bundle / "rack.json").read_text())
    assert main(["baseline", "set", str(bundle / "rack.json"), "--root", str(tree)]) == 0
    assert "bay7:" in capsys.readouterr().out
    got = next(b for b in baselines.read(baselines.baselines_path(tree)) if b.rack == "bay7")
    assert got.tokens_per_s == pytest.approx(rack["summary"]["output_tokens_per_s"], abs=0.05)
    assert got.tokens_per_j == pytest.approx(rack["summary"]["output_tokens_per_j"], abs=5e-5)
    assert (got.source, got.run_id) == ("bundle/rack.json", rack["rack_run_id"])
