"""The Prometheus rules: promtool check and promtool unit tests (a firing and a quiet case for
every alert), annotations, and the fast variant the live test loads."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from rackscope import contract
from rackscope.dashboards import names, rules

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "dashboards" / "rules"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool" / "rules_test.yml"
PROMTOOL = "/usr/bin/promtool"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], check=False, capture_output=True, text=True, timeout=120)


def committed_alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load((RULES_DIR / rules.RULES_FILE).read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules() -> None:
    files = sorted(str(p) for p in RULES_DIR.glob("*.yml"))
    assert len(files) == 2
    result = promtool("check", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == 2


@pytest.mark.slow
def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(PROMTOOL_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    doc = yaml.safe_load(PROMTOOL_TESTS.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    alert_names = {a["alert"] for a in committed_alerts()}
    assert len(alert_names) == 12
    assert alert_names - fires == set(), "alerts without a firing case"
    assert alert_names - quiet == set(), "alerts without a case where they must not fire"


def test_alerts_carry_severity_summary_description_runbook() -> None:
    for alert in committed_alerts():
        assert alert["alert"].startswith("Rackscope")
        assert alert["labels"]["severity"] in {"critical", "warning"}
        annotations = alert["annotations"]
        assert set(annotations) == {"summary", "description", "runbook"}
        assert all(len(v) > 20 for v in annotations.values())


def test_recording_rules_are_the_names_dashboards_query() -> None:
    doc = yaml.safe_load((RULES_DIR / rules.RULES_FILE).read_text())
    by_group = {g["name"]: [r["record"] for r in g["rules"] if "record" in r] for g in doc["groups"]}
    assert tuple(by_group["rackscope.recording"]) == names.RECORDED
    assert tuple(by_group["rackscope.compat"]) == names.COMPAT_RECORDED
    assert by_group["rackscope.alerts"] == []
    baselines = yaml.safe_load((RULES_DIR / rules.BASELINES_FILE).read_text())
    assert {r["record"] for g in baselines["groups"] for r in g["rules"]} == {
        names.RACK_BASELINE_TPS, names.RACK_BASELINE_TPJ}


def test_fast_variant_has_the_same_rules_with_second_windows(tmp_path: Path) -> None:
    fast = rules.rule_groups(rules.RuleParams.fast())
    slow = rules.rule_groups()
    assert [[r.get("record") or r.get("alert") for r in g["rules"]] for g in fast["groups"]] == \
           [[r.get("record") or r.get("alert") for r in g["rules"]] for g in slow["groups"]]
    for group in fast["groups"]:
        for rule in group["rules"]:
            assert rule.get("for", "0s").endswith("s"), rule
            assert "[1m]" not in rule["expr"]
            assert "[5m]" not in rule["expr"]
    path = tmp_path / "fast.yml"
    baselines = rules.baseline_groups({"r1": (240000, 11)})
    path.write_text(rules.to_yaml({"groups": fast["groups"] + baselines["groups"]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 32 rules found" in result.stdout


def test_renamed_histograms_keep_their_old_series_names() -> None:
    doc = yaml.safe_load((RULES_DIR / rules.RULES_FILE).read_text())
    (compat,) = [g["rules"] for g in doc["groups"] if g["name"] == "rackscope.compat"]
    ttft, tpot = "gen_ai_client_operation_time_to_first_chunk_seconds", "rackscope_time_per_output_token_seconds"
    assert {r["record"]: r["expr"] for r in compat} == {
        "gen_ai_server_time_to_first_token_seconds_bucket": f"{ttft}_bucket",
        "gen_ai_server_time_to_first_token_seconds_sum": f"{ttft}_sum",
        "gen_ai_server_time_to_first_token_seconds_count": f"{ttft}_count",
        "gen_ai_server_time_per_output_token_seconds_bucket": f"{tpot}_bucket",
        "gen_ai_server_time_per_output_token_seconds_sum": f"{tpot}_sum",
        "gen_ai_server_time_per_output_token_seconds_count": f"{tpot}_count",
    }
    # Nothing the agent exports now has an old name: the rules are the only source of those series.
    assert not {r["record"] for r in compat} & {
        m.prom_name + suffix for m in contract.ALL_METRICS for suffix in ("", "_bucket", "_sum", "_count")
    }
