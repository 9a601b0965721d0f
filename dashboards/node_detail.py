"""The Node / GPU detail dashboard: power against its limit, temperature, clocks, throttle
reasons, memory, NVLink per link and direction, the inference server's own view (queue, KV
cache, server- against client-counted tokens), XID and ECC errors of one node's GPUs."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.models import dashboard as dm

from rackscope.dashboards import names as n
from rackscope.dashboards import panels as p
from rackscope.dashboards.panels import Query as Q
from rackscope.dashboards.rack_overview import simulated_marker

UID = "rackscope-node-detail"

NODE = 'rack=~"$rack", node=~"$node"'
GPU = f'{NODE}, gpu=~"$gpu"'


def build() -> dict[str, Any]:
    b = (
        p.Board(UID, "rackscope / Node and GPU detail",
                "One node's GPUs: power against the limit, thermals, clocks, throttling, memory, links, errors.")
        .variable("rack", "Rack", p.label_values(n.NODE_INFO, "rack"), multi=False, include_all=False)
        .variable("node", "Node", p.label_values(f'{n.NODE_INFO}{{rack=~"$rack"}}', "node"),
                  multi=False, include_all=False)
        .variable("gpu", "GPU", p.label_values(f"{n.GPU_UP}{{{NODE}}}", "gpu"))
    )

    b.row("Node")
    marker, marker_q = simulated_marker(NODE)
    b.add(marker, "Hardware", p.NONE, "SIMULATED when this node's agent runs the simulated GPU source.",
          [marker_q], w=4, h=5)
    b.add(p.table_panel(), "Agent", p.NONE,
          "The agent's identity: GPU source, simulated or not, GPU model and count, version.",
          [Q(f"{n.NODE_INFO}{{{NODE}}}", instant=True, table_format=True)], w=8, h=5)
    b.add(p.stat_panel(), "Node output tokens/s", p.TOKENS_PER_S,
          "Output tokens per second of this node (rackscope:node_output_tokens_per_second).",
          [Q(f"{n.NODE_TPS}{{{NODE}}}")], w=4, h=5)
    b.add(p.stat_panel(), "Node tokens per joule", p.TOKENS_PER_J,
          "Output tokens per joule of this node's GPUs (rackscope:node_tokens_per_joule).",
          [Q(f"{n.NODE_TPJ}{{{NODE}}}")], w=4, h=5)
    b.add(p.stat_panel(graph=False), "GPUs answering", p.COUNT,
          "GPUs that answered the agent's last sample (rackscope_gpu_up == 1).",
          [Q(f"sum({n.GPU_UP}{{{NODE}}})", instant=True)], w=4, h=5)

    b.row("Power and thermals")
    b.add(p.graph_panel().override_by_regexp(*p.dashed(".* limit")), "Power vs limit", p.WATTS,
          "GPU power draw (solid) against the enforced power limit (dashed). A limit below the GPU's "
          "datasheet value is a power cap.",
          [Q(f"{n.POWER}{{{GPU}}}", "GPU {{gpu}}"), Q(f"{n.POWER_LIMIT}{{{GPU}}}", "GPU {{gpu}} limit")], w=12, h=8)
    b.add(p.graph_panel(), "Temperature", p.CELSIUS, "GPU core temperature.",
          [Q(f"{n.TEMPERATURE}{{{GPU}}}", "GPU {{gpu}}")], w=12, h=8)
    b.add(p.graph_panel(), "SM clock", p.HERTZ,
          "Streaming-multiprocessor clock; it drops under a power cap or thermal throttling.",
          [Q(f"{n.SM_CLOCK}{{{GPU}}}", "GPU {{gpu}}")], w=12, h=8)
    b.add(p.state_panel().mappings([dm.ValueMap(options={
        "0": dm.ValueMappingResult(text="clear", color="transparent", index=0),
        "1": dm.ValueMappingResult(text="active", color="red", index=1),
    })]), "Throttle reasons", p.NONE,
          "Clock-event (throttle) reasons per GPU over time; red while active. Idle is left out.",
          [Q(f'{n.THROTTLE}{{{GPU}, {n.REASON}!="gpu_idle"}}', f"GPU {{{{gpu}}}} {{{{{n.REASON}}}}}")], w=12, h=8)
    b.add(p.graph_panel().min(0).max(1), "Utilization", p.PERCENT_UNIT,
          "Share of time a kernel was running on each GPU.",
          [Q(f"{n.UTILIZATION}{{{GPU}}}", "GPU {{gpu}}")], w=12, h=8)
    b.add(p.graph_panel(), "Average power from energy", p.WATTS,
          "Average power over the rate window from the energy counters (rackscope:gpu_power_watts): the "
          "denominator of tokens per joule.",
          [Q(f"{n.GPU_POWER_W}{{{GPU}}}", "GPU {{gpu}}")], w=12, h=8)

    b.row("Memory and links")
    b.add(p.graph_panel().override_by_regexp(*p.dashed(".* size")), "HBM used vs size", p.BYTES,
          "GPU memory in use (solid) against the GPU's memory size (dashed).",
          [Q(f"{n.MEMORY_USED}{{{GPU}}}", "GPU {{gpu}}"), Q(f"{n.MEMORY_LIMIT}{{{GPU}}}", "GPU {{gpu}} size")],
          w=12, h=8)
    b.add(p.graph_panel().override_by_regexp(*p.negative_y(".*receive")), "GPU links per link and direction",
          p.BYTES_PER_S,
          "Bytes per second over each GPU link (nvlink, pcie, c2c); transmit above the axis, receive below.",
          [Q(f"rate({n.GPU_IO}{{{GPU}}}[$__rate_interval])",
             f"GPU {{{{gpu}}}} {{{{{n.LINK}}}}} {{{{{n.IO_DIRECTION}}}}}")], w=12, h=8)

    b.row("Inference server")
    b.add(p.graph_panel(), "Server queue: running and waiting", p.COUNT,
          "Requests the inference server holds, from its own metrics page: running (in a batch) and "
          "waiting (queued). A waiting queue that keeps rising fires the queue-growing alert.",
          [Q(f"sum by (model, {n.STATE}) ({n.ENGINE_REQUESTS}{{{NODE}}})", f"{{{{model}}}} {{{{{n.STATE}}}}}")],
          w=8, h=8)
    b.add(p.graph_panel().min(0).max(1), "Server KV-cache usage", p.PERCENT_UNIT,
          "Share of the inference server's KV cache in use, as the server reports it. Near 100 % the server "
          "preempts or queues requests.",
          [Q(f"{n.ENGINE_KV_CACHE}{{{NODE}}}", "{{model}}")], w=8, h=8)
    b.add(p.stat_panel(graph=False).mappings([dm.ValueMap(options={
        "0": dm.ValueMappingResult(text="STALE OR FAILING", color="red", index=0),
        "1": dm.ValueMappingResult(text="FRESH", color="green", index=1),
    })]), "Server metrics page", p.NONE,
          "Whether the agent read and understood the inference server's metrics page recently "
          "(rackscope_engine_up); the format it read is in the legend.",
          [Q(f"max by ({n.ENGINE_FORMAT}) ({n.ENGINE_UP}{{{NODE}}})", f"{{{{{n.ENGINE_FORMAT}}}}}", instant=True)],
          w=8, h=8)
    b.add(p.graph_panel(), "Output tokens/s: client-counted vs server-counted", p.TOKENS_PER_S,
          "Output tokens per second as the load generator counted them (rackscope:node_output_tokens_per_second) "
          "and as the inference server counted them (rackscope:node_engine_output_tokens_per_second).",
          [Q(f"{n.NODE_TPS}{{{NODE}}}", "client-counted"), Q(f"{n.NODE_ENGINE_TPS}{{{NODE}}}", "server-counted")],
          w=16, h=8)
    b.add(p.stat_panel().thresholds(p.thresholds((None, "red"), (0.99, "green"), (1.01, "red"))),
          "Server-counted over client-counted tokens", p.PERCENT_UNIT,
          "The server's output tokens/s over the client's (rackscope:node_engine_to_client_output_tokens_ratio). "
          "On a healthy run the two agree within 1 %; a gap means lost streams, a miscounting client or a "
          "server busy with other clients.",
          [Q(f"{n.NODE_ENGINE_OVER_CLIENT}{{{NODE}}}")], w=8, h=8)

    b.row("Errors")
    b.add(p.graph_panel(), "XID, ECC and NVLink errors", p.COUNT,
          "Errors counted per interval, per GPU and type (XID, ECC corrected/uncorrected, NVLink).",
          [Q(f"sum by (gpu, link, {n.ERROR_TYPE}) (increase({n.ERRORS}{{{GPU}}}[$__rate_interval]))",
             f"GPU {{{{gpu}}}} {{{{link}}}} {{{{{n.ERROR_TYPE}}}}}")], w=12, h=8)
    b.add(p.table_panel(), "Error counters", p.COUNT,
          "Cumulative error counts per GPU and type since the agent started.",
          [Q(f"{n.ERRORS}{{{GPU}}}", instant=True, table_format=True)], w=12, h=8)
    return b.to_dict()
