"""The generated dashboards, checked structurally: units, ids, data sources, variables, the
SIMULATED marker, and every query parsed by promtool and naming only contract metrics."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from rackscope import contract
from rackscope.dashboards import names
from rackscope.dashboards.rules import RuleParams
from tests.dashboards import grafana_json as gj

PROMTOOL = "/usr/bin/promtool"
# Any plausible value parses; the live test substitutes real ones.
PARSE_VALUES = {
    **gj.builtin_values("1m", "1h", "15s"),
    "datasource": "prometheus", "rack": "r1", "node": ".*", "gpu": ".*", "model": ".*",
    "run": "run-a", "baseline_run": "run-b",
}
KNOWN_METRICS = (
    {m.prom_name for m in contract.ALL_METRICS}
    | {names.TTFT_BUCKET, names.TPOT_BUCKET, names.DURATION_BUCKET}
    | set(names.RECORDED) | {names.RACK_BASELINE_TPS, names.RACK_BASELINE_TPJ}
    | {"ALERTS", "up"}
)
PROMQL_WORDS = {
    "sum", "by", "count", "or", "and", "unless", "on", "group_left", "offset", "vector", "rate", "increase",
    "histogram_quantile", "le", "max_over_time", "avg_over_time", "quantile", "max", "bool",
}


def test_three_dashboards_with_distinct_uids() -> None:
    uids = [d["uid"] for d in gj.dashboards().values()]
    assert sorted(uids) == ["rackscope-node-detail", "rackscope-rack-overview", "rackscope-run-comparison"]
    for d in gj.dashboards().values():
        assert d["title"].startswith("rackscope / ")
        assert d["schemaVersion"] >= 39  # Grafana 11 schema, from the pinned 11.6 SDK build
        assert "rackscope" in d["tags"]


@pytest.mark.parametrize("name", gj.DASHBOARD_FILES)
def test_every_panel_has_a_unit_an_id_and_the_datasource_variable(name: str) -> None:
    d = gj.load(name)
    ids = [p["id"] for p in gj.panels(d)]
    assert len(ids) == len(set(ids))
    assert all(i > 0 for i in ids)
    data_panels = [p for p in gj.panels(d) if p["type"] != "row"]
    assert len(data_panels) >= 10
    for p in data_panels:
        unit = p["fieldConfig"]["defaults"].get("unit")
        assert unit, f"panel {p['title']!r} has no unit"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert ref_ids == [chr(ord("A") + i) for i in range(len(ref_ids))], p["title"]
        assert p["description"], p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


def test_units_are_grafana_unit_ids_matching_what_panels_show() -> None:
    units = {}
    for d in gj.dashboards().values():
        for p in gj.panels(d):
            if p["type"] != "row":
                units[p["title"]] = p["fieldConfig"]["defaults"]["unit"]
    assert units["Rack output tokens/s"] == "si:tok/s"
    assert units["Rack GPU power"] == "kwatt"
    assert units["Power vs limit"] == "watt"
    assert units["Tokens per joule"] == "si:tok/J"
    assert units["NVLink traffic per GPU"] == "Bps"
    assert units["Time to first token"] == "s"
    assert units["GPU energy in range"] == "kwatth"
    assert units["SM clock"] == "hertz"


def test_rack_overview_variables_and_annotations() -> None:
    d = gj.load("rack-overview.json")
    v = gj.variables(d)
    assert list(v) == ["datasource", "rack", "node", "gpu", "model"]
    assert v["datasource"]["type"] == "datasource"
    assert v["datasource"]["query"] == "prometheus"
    assert v["rack"]["query"] == "label_values(rackscope_node_info, rack)"
    assert v["node"]["query"] == 'label_values(rackscope_node_info{rack=~"$rack"}, node)'
    for name in ("rack", "node", "gpu", "model"):
        assert v[name]["includeAll"]
        assert v[name]["allValue"] == ".*"
    annotations = dict(gj.annotation_exprs(d))
    assert set(annotations) == {"Run started", "Run ended"}
    assert all(names.RUN_INFO in e for e in annotations.values())


@pytest.mark.parametrize("name", ["rack-overview.json", "node-detail.json"])
def test_simulated_marker(name: str) -> None:
    d = gj.load(name)
    (marker,) = [p for p in gj.panels(d) if p["title"] == "Hardware"]
    assert marker["type"] == "stat"
    assert 'simulated="true"' in marker["targets"][0]["expr"]
    texts = {}
    for m in marker["fieldConfig"]["defaults"]["mappings"]:
        if m["type"] == "value":
            texts.update({value: r["text"] for value, r in m["options"].items()})
        else:
            texts[(m["options"]["from"], m["options"]["to"])] = m["options"]["result"]["text"]
    assert texts["0"] == "REAL HARDWARE"
    assert texts[(1, 1e9)] == "SIMULATED"
    assert marker["gridPos"]["y"] <= 1  # first thing on the page


def test_straggler_bar_gauge_uses_the_alert_threshold() -> None:
    d = gj.load("rack-overview.json")
    (bars,) = [p for p in gj.panels(d) if p["title"] == "Node throughput vs rack median"]
    steps = bars["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["color"] for s in steps] == ["red", "orange", "green"]
    assert steps[1]["value"] == RuleParams().straggler_ratio
    assert names.RACK_NODE_MEDIAN_TPS in bars["targets"][0]["expr"]


def test_required_panels_present() -> None:
    titles = {name: {p["title"] for p in gj.panels(d)} for name, d in gj.dashboards().items()}
    assert {
        "Rack output tokens/s", "Rack output tokens/s vs baseline", "Tokens/s per GPU",
        "Node throughput vs rack median",
        "Rack GPU power", "Tokens per joule", "Tokens per joule per node", "GPU energy in range",
        "NVLink traffic per GPU", "HBM used per GPU", "Time to first token", "Time per output token",
        "Requests/s by outcome", "Request error ratio", "Throttled GPUs by reason", "Firing alerts",
    } <= titles["rack-overview.json"]
    assert {
        "Power vs limit", "Temperature", "SM clock", "Throttle reasons", "HBM used vs size",
        "GPU links per link and direction", "XID, ECC and NVLink errors",
    } <= titles["node-detail.json"]
    assert {"Throughput vs baseline", "Tokens per joule vs baseline", "Output tokens/s"} <= titles[
        "run-comparison.json"]


def _all_exprs() -> list[tuple[str, str]]:
    out = []
    for name, d in gj.dashboards().items():
        out += [(f"{t.dashboard}/{t.panel}/{t.ref_id}", t.expr) for t in gj.targets(name, d)]
        out += [(f"{name}/annotation {a}", e) for a, e in gj.annotation_exprs(d)]
        out += [(f"{name}/variable {k}", v["query"]) for k, v in gj.variables(d).items() if v["type"] == "query"]
    return out


def test_every_query_names_only_contract_metrics_and_recording_rules() -> None:
    for where, query in _all_exprs():
        expr = re.sub(r'"[^"]*"', '""', query)  # label values are not names
        expr = re.sub(r"\{[^}]*\}", "{}", expr)  # nor label names inside selectors
        expr = re.sub(r"\b(by|on|group_left)\s*\([^)]*\)", "", expr)
        expr = re.sub(r"label_values\((.*),\s*\w+\)", r"\1", expr)
        expr = re.sub(r"\b\d[\w.]*", "", expr)  # numbers and durations (30s, 3.6e6)
        tokens = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
        unknown = {t for t in tokens if t not in PROMQL_WORDS and not t.startswith("__") and t != "Inf"}
        assert unknown <= KNOWN_METRICS, f"{where}: unknown names {unknown - KNOWN_METRICS}"


def test_every_query_parses(tmp_path: Path) -> None:
    """promtool parses each query (variables substituted) as a recording rule expression."""
    rules = []
    for i, (where, query) in enumerate(_all_exprs()):
        expr = query[len("label_values("):].rsplit(",", 1)[0] if query.startswith("label_values(") else query
        rules.append({"record": f"q:{i}", "expr": gj.substitute(expr, PARSE_VALUES), "labels": {"where": where}})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
