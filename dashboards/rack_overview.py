"""The Rack overview dashboard: rack tokens/s against its baseline, stragglers, kW, tokens per
joule, energy, NVLink, HBM, latency, requests, the inference servers' queues and KV caches,
throttling, alerts and run annotations."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm

from rackscope.dashboards import names as n
from rackscope.dashboards import panels as p
from rackscope.dashboards.panels import Query as Q
from rackscope.dashboards.rules import RuleParams

UID = "rackscope-rack-overview"

RACK = 'rack=~"$rack"'
NODE = f'{RACK}, node=~"$node"'
GPU = f'{NODE}, gpu=~"$gpu"'
MODEL = f'{NODE}, model=~"$model"'
# Alerts without a rack label (a scrape target down) show under every rack selection.
ALERT_RACK = 'rack=~"($rack)?"'


def simulated_marker(selector: str) -> tuple[p.PanelBuilder, Q]:
    """A stat that reads SIMULATED whenever a selected node runs on simulated GPUs."""
    panel = (
        p.stat_panel(common.BigValueColorMode.BACKGROUND, graph=False)
        .mappings([
            dm.ValueMap(options={"0": dm.ValueMappingResult(text="REAL HARDWARE", color="green", index=0)}),
            dm.RangeMap(options=dm.DashboardRangeMapOptions(
                from_val=1, to=1e9, result=dm.ValueMappingResult(text="SIMULATED", color="orange", index=1))),
        ])
        .thresholds(p.thresholds((None, "green"), (1, "orange")))
    )
    query = Q(f'count({n.NODE_INFO}{{{selector}, simulated="true"}}) or vector(0)', instant=True)
    return panel, query


def quantiles(bucket: str, selector: str, what: str) -> list[Q]:
    return [
        Q(f"histogram_quantile({q}, sum by (le) (rate({bucket}{{{selector}}}[$__rate_interval])))",
          f"{what} p{int(q * 100)}")
        for q in (0.5, 0.99)
    ]


def build() -> dict[str, Any]:
    straggler = RuleParams().straggler_ratio
    b = (
        p.Board(UID, "rackscope / Rack overview",
                "Live output tokens/s, power and tokens per joule of a rack running LLM inference.")
        .variable("rack", "Rack", p.label_values(n.NODE_INFO, "rack"))
        .variable("node", "Node", p.label_values(f"{n.NODE_INFO}{{{RACK}}}", "node"))
        .variable("gpu", "GPU", p.label_values(f"{n.GPU_UP}{{{NODE}}}", "gpu"))
        .variable("model", "Model", p.label_values(f"{n.TOKENS}{{{RACK}}}", "model"))
        .annotation(p.PromAnnotation(
            "Run started", f"({n.RUN_INFO}{{{RACK}}} == 1) unless ({n.RUN_INFO}{{{RACK}}} offset 30s == 1)",
            "green", "Run {{run_id}} started", "{{scenario}}, {{model}} on {{engine}}, node {{node}}",
            "rack,node,scenario"))
        .annotation(p.PromAnnotation(
            "Run ended", f"({n.RUN_INFO}{{{RACK}}} offset 30s == 1) unless ({n.RUN_INFO}{{{RACK}}} == 1)",
            "purple", "Run {{run_id}} ended", "{{scenario}}, {{model}} on {{engine}}, node {{node}}",
            "rack,node,scenario"))
    )

    b.row("Rack")
    marker, marker_q = simulated_marker(RACK)
    b.add(marker, "Hardware", p.NONE,
          "SIMULATED while any selected node reports simulated GPUs (rackscope_node_info{simulated=\"true\"}).",
          [marker_q], w=4, h=4)
    b.add(p.stat_panel(), "Rack output tokens/s", p.TOKENS_PER_S,
          "Output tokens per second of the selected racks (recording rule rackscope:rack_output_tokens_per_second).",
          [Q(f"sum({n.RACK_TPS}{{{RACK}}})")], w=5, h=4)
    b.add(p.stat_panel(graph=False).thresholds(p.thresholds((None, "red"), (0.9, "orange"), (0.97, "green"))),
          "Of baseline", p.PERCENT_UNIT,
          "Rack output tokens/s as a share of the configured baseline (dashboards/rules/baselines.yml).",
          [Q(f"sum({n.RACK_TPS}{{{RACK}}}) / sum({n.RACK_BASELINE_TPS}{{{RACK}}})", instant=True)], w=3, h=4)
    b.add(p.stat_panel(), "Tokens/s per GPU", p.TOKENS_PER_S,
          "Rack output tokens/s divided by the number of GPUs the agents report (answering or not).",
          [Q(f"sum({n.RACK_TPS}{{{RACK}}}) / count({n.GPU_UP}{{{RACK}}})")], w=4, h=4)
    b.add(p.stat_panel(), "Rack GPU power", p.KILOWATTS,
          "Average GPU power of the selected racks over the rate window, from the energy counters.",
          [Q(f"sum({n.RACK_POWER_KW}{{{RACK}}})")], w=4, h=4)
    b.add(p.stat_panel(), "Tokens per joule", p.TOKENS_PER_J,
          "Output tokens per joule of GPU energy: rate(output tokens) / rate(energy).",
          [Q(f"sum({n.RACK_TPS}{{{RACK}}}) / (sum({n.RACK_POWER_KW}{{{RACK}}}) * 1000)")], w=4, h=4)

    b.add(p.graph_panel().override_by_regexp(*p.dashed(".*baseline")), "Rack output tokens/s vs baseline",
          p.TOKENS_PER_S,
          "Rack output tokens/s (solid) against the configured baseline (dashed). The throughput-regression "
          "alert fires below 90 % of both the baseline and the rack's own recent maximum.",
          [Q(f"sum by (rack) ({n.RACK_TPS}{{{RACK}}})", "{{rack}}"),
           Q(f"{n.RACK_BASELINE_TPS}{{{RACK}}}", "{{rack}} baseline")], w=16, h=9)
    b.add(p.table_panel(), "Firing alerts", p.NONE,
          "Alerts Prometheus is firing now (the ALERTS series) for the selected racks, plus those without a rack.",
          [Q(f'ALERTS{{alertstate="firing", {ALERT_RACK}}}', instant=True, table_format=True)], w=8, h=9)

    b.row("Nodes")
    b.add(p.bar_gauge_panel().min(0.5).max(1.1)
          .thresholds(p.thresholds((None, "red"), (straggler, "orange"), (0.97, "green"))),
          "Node throughput vs rack median", p.PERCENT_UNIT,
          f"Each node's output tokens/s as a share of its rack's median node. Red bars, below "
          f"{straggler:.0%}, are stragglers (the straggler alert uses the same threshold).",
          [Q(f"{n.NODE_TPS}{{{NODE}}} / on (rack) group_left () {n.RACK_NODE_MEDIAN_TPS}{{{RACK}}}",
             "{{node}}", instant=True)], w=12, h=10)
    b.add(p.bar_gauge_panel(), "Node output tokens/s", p.TOKENS_PER_S,
          "Output tokens per second of each node (recording rule rackscope:node_output_tokens_per_second).",
          [Q(f"{n.NODE_TPS}{{{NODE}}}", "{{node}}", instant=True)], w=12, h=10)
    b.add(p.graph_panel(), "Output tokens/s per GPU", p.TOKENS_PER_S,
          "Output tokens per second of each GPU (rackscope:gpu_output_tokens_per_second).",
          [Q(f"{n.GPU_TPS}{{{GPU}}}", "{{node}} GPU {{gpu}}")], w=12, h=8)
    b.add(p.bar_gauge_panel(), "Tokens per joule per node", p.TOKENS_PER_J,
          "Output tokens per joule of each node (rackscope:node_tokens_per_joule). A node well below its "
          "peers spends energy without producing tokens (see the node-efficiency alert).",
          [Q(f"{n.NODE_TPJ}{{{NODE}}}", "{{node}}", instant=True)], w=12, h=8)

    b.row("Power and energy")
    b.add(p.graph_panel(), "Rack GPU power", p.KILOWATTS,
          "GPU power of each rack in kW (rackscope:rack_power_kilowatts, from the energy counters).",
          [Q(f"sum by (rack) ({n.RACK_POWER_KW}{{{RACK}}})", "{{rack}}")], w=8, h=8)
    b.add(p.graph_panel(), "Tokens per joule", p.TOKENS_PER_J,
          "Output tokens per joule of each rack and each node.",
          [Q(f"{n.RACK_TPJ}{{{RACK}}}", "rack {{rack}}"), Q(f"{n.NODE_TPJ}{{{NODE}}}", "{{node}}")], w=8, h=8)
    b.add(p.stat_panel(graph=False), "GPU energy in range", p.KILOWATT_HOURS,
          "GPU energy used by the selected nodes over the dashboard's time range.",
          [Q(f"sum(increase({n.ENERGY}{{{NODE}}}[$__range])) / 3.6e6", instant=True)], w=4, h=8)
    b.add(p.stat_panel(graph=False), "Output tokens in range", p.COUNT,
          "Output tokens produced by the selected nodes over the dashboard's time range.",
          [Q(f"sum(increase({n.TOKENS}{{{MODEL}, {n.OUTPUT_TOKENS}}}[$__range]))", instant=True)], w=4, h=8)

    b.row("GPUs")
    b.add(p.graph_panel().override_by_regexp(*p.negative_y(".*receive")), "NVLink traffic per GPU",
          p.BYTES_PER_S,
          "NVLink bytes per second of each GPU; transmit above the axis, receive below.",
          [Q(f"sum by (node, gpu, {n.IO_DIRECTION}) (rate({n.GPU_IO}{{{GPU}, {n.NVLINK}}}[$__rate_interval]))",
             f"{{{{node}}}} GPU {{{{gpu}}}} {{{{{n.IO_DIRECTION}}}}}")], w=12, h=8)
    b.add(p.graph_panel(), "HBM used per GPU", p.BYTES,
          "GPU memory in use (weights, KV cache, context) per GPU.",
          [Q(f"{n.MEMORY_USED}{{{GPU}}}", "{{node}} GPU {{gpu}}")], w=12, h=8)
    b.add(p.graph_panel(stacked=True), "Throttled GPUs by reason", p.COUNT,
          "How many selected GPUs have each clock-event (throttle) reason active; idle is left out.",
          [Q(f'sum by ({n.REASON}) ({n.THROTTLE}{{{GPU}, {n.REASON}!="gpu_idle"}})', f"{{{{{n.REASON}}}}}")],
          w=12, h=8)
    b.add(p.graph_panel(), "GPU errors", p.COUNT,
          "XID, ECC and NVLink errors counted per interval, by type.",
          [Q(f"sum by (link, {n.ERROR_TYPE}) (increase({n.ERRORS}{{{GPU}}}[$__rate_interval]))",
             f"{{{{link}}}} {{{{{n.ERROR_TYPE}}}}}")], w=12, h=8)

    b.row("Latency and requests")
    b.add(p.graph_panel(), "Time to first token", p.SECONDS,
          "TTFT p50 and p99 over the selected nodes and models, as the client measured it "
          "(gen_ai.client.operation.time_to_first_chunk).",
          quantiles(n.TTFT_BUCKET, MODEL, "TTFT"), w=8, h=8)
    b.add(p.graph_panel(), "Time per output token", p.SECONDS,
          "Each request's mean time per output token after the first (TPOT), p50 and p99 over requests "
          "(rackscope.time_per_output_token).",
          quantiles(n.TPOT_BUCKET, MODEL, "TPOT"), w=8, h=8)
    b.add(p.graph_panel(), "End-to-end request latency", p.SECONDS,
          "Request duration p50 and p99 (gen_ai.client.operation.duration).",
          quantiles(n.DURATION_BUCKET, MODEL, "latency"), w=8, h=8)
    b.add(p.graph_panel(stacked=True), "Requests/s by outcome", p.REQUESTS_PER_S,
          "Finished requests per second: ok, error, cancelled.",
          [Q(f"sum by ({n.OUTCOME}) (rate({n.REQUESTS}{{{MODEL}}}[$__rate_interval]))", f"{{{{{n.OUTCOME}}}}}")],
          w=8, h=8)
    b.add(p.stat_panel().thresholds(p.thresholds((None, "green"), (0.001, "orange"), (0.01, "red"))),
          "Request error ratio", p.PERCENT_UNIT,
          "Share of finished requests that failed (outcome=\"error\").",
          [Q(f'(sum(rate({n.REQUESTS}{{{MODEL}, {n.OUTCOME}="error"}}[$__rate_interval])) or vector(0))'
             f" / sum(rate({n.REQUESTS}{{{MODEL}}}[$__rate_interval]))")], w=8, h=8)
    b.add(p.graph_panel(), "Output tokens/s by model", p.TOKENS_PER_S,
          "Output tokens per second of the selected nodes, split by model and engine.",
          [Q(f"sum by (model, engine) (rate({n.TOKENS}{{{MODEL}, {n.OUTPUT_TOKENS}}}[$__rate_interval]))",
             "{{model}} ({{engine}})")], w=8, h=8)

    b.row("Inference servers")
    b.add(p.graph_panel(), "Server queues per node", p.COUNT,
          "Requests each node's inference server holds, from its own metrics page: waiting (queued) and "
          "running (in a batch).",
          [Q(f"sum by (node) ({n.ENGINE_REQUESTS}{{{NODE}, {n.WAITING}}})", "{{node}} waiting"),
           Q(f'sum by (node) ({n.ENGINE_REQUESTS}{{{NODE}, {n.STATE}="running"}})', "{{node}} running")],
          w=8, h=8)
    b.add(p.graph_panel().min(0).max(1), "Server KV-cache usage per node", p.PERCENT_UNIT,
          "Share of each inference server's KV cache in use, as the server reports it.",
          [Q(f"max by (node) ({n.ENGINE_KV_CACHE}{{{NODE}}})", "{{node}}")], w=8, h=8)
    b.add(p.graph_panel(), "Server-counted over client-counted tokens", p.PERCENT_UNIT,
          "Each node's output tokens/s as its inference server counted them over what the load generator "
          "counted (rackscope:node_engine_to_client_output_tokens_ratio); within 1 % of 100 % on a healthy run.",
          [Q(f"{n.NODE_ENGINE_OVER_CLIENT}{{{NODE}}}", "{{node}}")], w=8, h=8)

    b.row("Runs")
    b.add(p.table_panel(), "Active runs", p.NONE,
          "Runs active now on the selected nodes (rackscope_run_info == 1).",
          [Q(f"{n.RUN_INFO}{{{NODE}}} == 1", instant=True, table_format=True)], w=24, h=6)
    return b.to_dict()
