"""Prometheus recording and alert rules, built from one source so the committed rule file,
the Kubernetes PrometheusRule and the fast variant the live test loads cannot drift apart.

Windows, ``for:`` durations and thresholds are ``RuleParams`` fields. ``RuleParams()`` gives the
production rules (rate windows of 1 m suit scrape intervals up to 15 s); ``RuleParams.fast()``
shrinks every duration to seconds for a Prometheus scraping once a second in a test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from rackscope.dashboards import names as n

Rule = dict[str, Any]
RULES_FILE = "rackscope.rules.yml"
BASELINES_FILE = "baselines.yml"


@dataclass(frozen=True)
class RuleParams:
    rate_window: str = "1m"  # rate() window of the recording rules
    stale_window: str = "2m"  # no energy counter moved in this long: telemetry stale
    disappeared_offset: str = "10m"  # a node seen this long ago and gone now: telemetry stale
    recent_max_window: str = "30m"  # "the run's own recent maximum"
    error_window: str = "5m"  # increase() window of the error-counter alerts
    for_regression: str = "5m"
    for_straggler: str = "5m"
    for_efficiency: str = "10m"
    for_throttle: str = "2m"
    for_down: str = "1m"
    for_stale: str = "2m"
    for_gpu_lost: str = "1m"
    queue_window: str = "5m"  # deriv() window of the waiting-queue trend
    for_queue: str = "5m"  # so the queue has been rising for queue_window + for_queue
    regression_ratio: float = 0.90  # below this share of baseline and of the recent maximum
    straggler_ratio: float = 0.90  # below this share of the rack's median node
    efficiency_ratio: float = 0.90  # tokens/J below this share of the rack's median node
    capped_ratio: float = 0.95  # a power limit below this share of the rack's highest is a cap

    @classmethod
    def fast(cls) -> RuleParams:
        """Second-scale windows for a test Prometheus that scrapes and evaluates every second."""
        return cls(
            rate_window="6s", stale_window="10s", disappeared_offset="30s", recent_max_window="30s",
            error_window="10s", for_regression="3s", for_straggler="3s", for_efficiency="3s",
            for_throttle="3s", for_down="3s", for_stale="3s", for_gpu_lost="3s", queue_window="10s",
            for_queue="3s",
        )


def _pct(ratio: float) -> str:
    return f"{ratio * 100:g} %"


def recording_rules(p: RuleParams) -> list[Rule]:
    w = p.rate_window
    return [
        {"record": n.GPU_TPS, "expr": f"sum by (rack, node, gpu) (rate({n.TOKENS}{{{n.OUTPUT_TOKENS}}}[{w}]))"},
        {"record": n.NODE_TPS, "expr": f"sum by (rack, node) ({n.GPU_TPS})"},
        {"record": n.RACK_TPS, "expr": f"sum by (rack) ({n.NODE_TPS})"},
        {"record": n.RACK_NODE_MEDIAN_TPS, "expr": f"quantile by (rack) (0.5, {n.NODE_TPS})"},
        # Average power over the window from the energy counter: exact, unlike sampling the
        # instantaneous power gauge, and the same denominator tokens per joule needs.
        {"record": n.GPU_POWER_W, "expr": f"sum by (rack, node, gpu) (rate({n.ENERGY}[{w}]))"},
        {"record": n.NODE_POWER_W, "expr": f"sum by (rack, node) ({n.GPU_POWER_W})"},
        {"record": n.RACK_POWER_KW, "expr": f"sum by (rack) ({n.NODE_POWER_W}) / 1000"},
        # tokens per joule = rate(output tokens) / rate(energy)
        {"record": n.NODE_TPJ, "expr": f"{n.NODE_TPS} / {n.NODE_POWER_W}"},
        {"record": n.RACK_TPJ, "expr": f"{n.RACK_TPS} / on (rack) ({n.RACK_POWER_KW} * 1000)"},
        {"record": n.RACK_NODE_MEDIAN_TPJ, "expr": f"quantile by (rack) (0.5, {n.NODE_TPJ})"},
        # The inference server's own count of the tokens it generated, from its metrics page;
        # on a healthy run it agrees with the client's count within 1 %.
        {"record": n.NODE_ENGINE_TPS,
         "expr": f"sum by (rack, node) (rate({n.ENGINE_TOKENS}{{{n.OUTPUT_TOKENS}}}[{w}]))"},
        {"record": n.NODE_ENGINE_OVER_CLIENT, "expr": f"{n.NODE_ENGINE_TPS} / ({n.NODE_TPS} > 0)"},
    ]


def _active_rack() -> str:
    return f"count by (rack) ({n.RUN_INFO} == 1)"


def _regression_expr(value: str, baseline: str, p: RuleParams) -> str:
    # A rack without a configured baseline compares against +Inf, so the recent-maximum
    # condition alone decides rather than the alert never firing.
    r = p.regression_ratio
    return (
        f"(\n  {value}\n    < on (rack) ({r:g} * ({baseline} or on (rack) ({value} * 0 + Inf)))\n)\n"
        f"and\n(\n  {value}\n    < {r:g} * max_over_time({value}[{p.recent_max_window}])\n)\n"
        f"and on (rack)\n  {_active_rack()}"
    )


def alert_rules(p: RuleParams) -> list[Rule]:
    rr, sr, er = _pct(p.regression_ratio), _pct(p.straggler_ratio), _pct(p.efficiency_ratio)
    rack, node, gpu = "{{ $labels.rack }}", "{{ $labels.node }}", "{{ $labels.gpu }}"
    where_gpu = f"GPU {gpu} of node {node} (rack {rack})"
    return [
        _alert(
            "RackscopeRackThroughputRegression", _regression_expr(n.RACK_TPS, n.RACK_BASELINE_TPS, p),
            p.for_regression, "critical",
            f"Rack {rack} output tokens/s regressed",
            f"Rack {rack} has produced less than {rr} of its configured baseline output tokens/s and less "
            f"than {rr} of its own maximum over the last {p.recent_max_window}, for {p.for_regression}, "
            "while a run is active.",
            "Open the Rack overview: if one node's bar is short, follow the straggler alert for it; if all "
            "nodes dropped together, look for rack-wide throttling (power, cooling) or a change of model, "
            "engine or scenario in the run annotations.",
        ),
        _alert(
            "RackscopeNodeStraggler",
            f"{n.NODE_TPS}\n  < on (rack) group_left () ({p.straggler_ratio:g} * {n.RACK_NODE_MEDIAN_TPS})\n"
            f"and on (rack, node)\n  ({n.RUN_INFO} == 1)",
            p.for_straggler, "warning",
            f"Node {node} is a straggler in rack {rack}",
            f"Node {node} of rack {rack} has produced less than {sr} of the rack's median node output "
            f"tokens/s for {p.for_straggler} while running a workload.",
            "Open Node / GPU detail for the node: a power limit below its peers, thermal throttling, low "
            "SM clocks or NVLink traffic below the other GPUs usually explain it; check XID errors too.",
        ),
        _alert(
            "RackscopePerfPerWattRegression", _regression_expr(n.RACK_TPJ, n.RACK_BASELINE_TPJ, p),
            p.for_efficiency, "warning",
            f"Rack {rack} tokens per joule regressed",
            f"Rack {rack} has produced less than {rr} of its configured baseline tokens per joule and less "
            f"than {rr} of its own maximum over the last {p.recent_max_window}, for {p.for_efficiency}, "
            "while a run is active.",
            "Compare kW and tokens/s on the Rack overview: power steady while tokens/s fell points at the "
            "workload or interconnect (NVLink, batch size); both fell points at throttling.",
        ),
        _alert(
            "RackscopeNodeEfficiencyLow",
            f"{n.NODE_TPJ}\n  < on (rack) group_left () ({p.efficiency_ratio:g} * {n.RACK_NODE_MEDIAN_TPJ})\n"
            f"and on (rack, node)\n  ({n.RUN_INFO} == 1)",
            p.for_efficiency, "warning",
            f"Node {node} spends more energy per token than its rack",
            f"Node {node} of rack {rack} has produced less than {er} of the rack's median tokens per joule "
            f"for {p.for_efficiency} while running a workload.",
            "Open Node / GPU detail: power near the limit while tokens/s is low usually means a degraded "
            "NVLink (traffic below the other GPUs) or a GPU spinning on retries; compare its NVLink panels.",
        ),
        _alert(
            "RackscopeGpuPowerThrottled",
            f"(max by (rack, node, gpu) ({n.THROTTLE}{{{n.POWER_THROTTLE_HW}}}) == 1)\nor\n(\n"
            f"  (max by (rack, node, gpu) ({n.THROTTLE}{{{n.POWER_THROTTLE_SW}}}) == 1)\n"
            f"  and on (rack, node, gpu)\n  (\n    {n.POWER_LIMIT}\n"
            f"      < on (rack) group_left () ({p.capped_ratio:g} * max by (rack) ({n.POWER_LIMIT}))\n  )\n)",
            p.for_throttle, "warning",
            f"{where_gpu} is power throttled",
            f"{where_gpu} has had its clocks held back by hardware slowdown or power brake, or by a software "
            f"power cap below {_pct(p.capped_ratio)} of the highest limit in the rack, for {p.for_throttle}. "
            "A saturated GPU touching its normal limit does not count.",
            "Check the enforced power limit on Node / GPU detail against its peers (nvidia-smi -q -d POWER); "
            "reset a stray cap, and check PSU and rack power budget for hardware slowdown or power brake.",
        ),
        _alert(
            "RackscopeGpuThermalThrottled",
            f"max by (rack, node, gpu) ({n.THROTTLE}{{{n.THERMAL_THROTTLE}}}) == 1",
            p.for_throttle, "warning",
            f"{where_gpu} is thermally throttled",
            f"{where_gpu} has had its clocks cut by software or hardware thermal slowdown for {p.for_throttle}.",
            "Check the temperature panel and the node's cooling (liquid loop flow and inlet temperature on "
            "an NVL72 rack, fans elsewhere); compare with neighbouring GPUs to tell a cold plate from a loop.",
        ),
        _alert(
            "RackscopeEngineQueueGrowing",
            # The waiting count first: an alert's value is its left operand's.
            f"({n.ENGINE_REQUESTS}{{{n.WAITING}}} > 0)\n"
            f"and\n(deriv({n.ENGINE_REQUESTS}{{{n.WAITING}}}[{p.queue_window}]) > 0)",
            p.for_queue, "warning",
            f"The inference server's queue on node {node} keeps growing",
            f"Requests waiting in the inference server of node {node} (rack {rack}, model "
            f"{{{{ $labels.model }}}}) have trended up over every {p.queue_window} window for {p.for_queue}; "
            "{{ $value }} are waiting now. Requests arrive faster than the server finishes them.",
            "Compare arrivals with the server's output tokens/s on Node / GPU detail: a server slower than "
            "usual (throttled GPUs, a KV cache full to 100 %, preemptions) or a client sending more than "
            "the deployment was sized for. Lower the offered load or add replicas before latency limits break.",
        ),
        _alert(
            "RackscopeTargetDown", f'up{{job=~"{n.JOB_PATTERN}"}} == 0', p.for_down, "critical",
            "Scrape target {{ $labels.instance }} ({{ $labels.job }}) is down",
            "Prometheus has failed to scrape {{ $labels.instance }} of job {{ $labels.job }} for "
            f"{p.for_down}: the agent or the collector is not running or not reachable.",
            "Check the process (systemctl status, kubectl get pods, docker compose ps) and its log; "
            "curl its /metrics from the Prometheus host to tell a dead process from a network problem.",
        ),
        _alert(
            "RackscopeTelemetryStale",
            f"(sum by (rack, node) (rate({n.ENERGY}[{p.stale_window}])) == 0)\nor\n"
            f"(\n  count by (rack, node) ({n.NODE_INFO} offset {p.disappeared_offset})\n"
            f"    unless on (rack, node)\n  count by (rack, node) ({n.NODE_INFO})\n)",
            p.for_stale, "warning",
            f"Telemetry of node {node} (rack {rack}) is stale",
            f"No GPU energy counter of node {node} has moved for {p.stale_window}, or the node reported "
            f"{p.disappeared_offset} ago and has vanished since: the agent stopped sampling or its data "
            "stops short of Prometheus (collector, network).",
            "Check the agent's log and its /metrics; on the collector path check the collector's "
            "otelcol_exporter_send_failed_metric_points and the agent's export failures. A node removed "
            f"on purpose clears after {p.disappeared_offset}.",
        ),
        _alert(
            "RackscopeGpuLost", f"{n.GPU_UP} == 0", p.for_gpu_lost, "critical",
            f"{where_gpu} stopped answering",
            f"{where_gpu} has not answered the agent's samples for {p.for_gpu_lost} (fallen off the bus, "
            "driver hung or GPU reset).",
            "Look for XID 79 or 119 in the kernel log (dmesg) and nvidia-smi; drain the node, reset the "
            "GPU or reboot, and open a hardware ticket if it recurs.",
        ),
        _alert(
            "RackscopeNvlinkErrors",
            f"sum by (rack, node, gpu) (increase({n.ERRORS}{{{n.NVLINK_ERRORS}}}[{p.error_window}])) > 0",
            "0s", "warning",
            f"NVLink errors on {where_gpu}",
            f"{where_gpu} counted NVLink errors (CRC, replay or recovery) in the last {p.error_window}.",
            "Compare the GPU's NVLink traffic with its peers on Node / GPU detail and check nvidia-smi "
            "nvlink -e; persistent counts mean a cable, tray or switch port to reseat or replace.",
        ),
        _alert(
            "RackscopeXidErrors",
            f"sum by (rack, node, gpu) (increase({n.ERRORS}{{{n.XID}}}[{p.error_window}])) > 0",
            "0s", "critical",
            f"XID error on {where_gpu}",
            f"{where_gpu} reported an XID error (a GPU fault seen by the driver) in the last {p.error_window}.",
            "Read the XID code in the kernel log (dmesg | grep -i xid): 13/31/43 are usually the application, "
            "48/63/64/74/79/92/94/95/119 the hardware or driver; drain the node for the latter.",
        ),
    ]


def _alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str, runbook: str) -> Rule:
    rule: Rule = {"alert": name, "expr": expr}
    if for_ != "0s":
        rule["for"] = for_
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {"summary": summary, "description": description, "runbook": runbook}
    return rule


def compat_rules() -> list[Rule]:
    """Histogram series renamed after 0.1.0, recorded under their old names from the new ones,
    so dashboards and alerts written against the old names keep working until the next
    release (docs/dashboards.md, Migration). The copies carry the new series' labels, which
    add gen_ai_operation_name, gen_ai_provider_name and gen_ai_request_model, and the new
    metric's bucket boundaries (``le``)."""
    return [{"record": old, "expr": new} for old, new in n.COMPAT]


def rule_groups(p: RuleParams | None = None) -> dict[str, Any]:
    p = p or RuleParams()
    return {
        "groups": [
            {"name": "rackscope.recording", "rules": recording_rules(p)},
            {"name": "rackscope.alerts", "rules": alert_rules(p)},
            {"name": "rackscope.compat", "rules": compat_rules()},
        ]
    }


def baseline_groups(baselines: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """Baseline recording rules: rack -> (output tokens/s, tokens per joule), written the one way
    ``rackscope baseline set`` writes them."""
    from rackscope.dashboards.baselines import Baseline, groups

    return groups([Baseline(rack, tps, tpj) for rack, (tps, tpj) in baselines.items()])


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings so PromQL reads as written."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
