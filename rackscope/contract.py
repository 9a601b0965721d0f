"""The metric contract: every series rackscope exports, its OpenTelemetry name and unit, and
the Prometheus name both export paths must give.

Names follow OpenTelemetry semantic conventions where they exist (``hw.*``, ``gen_ai.*``) and
use ``rackscope.*`` otherwise. The Prometheus names here are a public contract: dashboards and
alert rules query them. They are what the OpenTelemetry Collector's Prometheus translator (and
Prometheus's own OTLP receiver) produce from the OTel name and unit, and the agent's own
``/metrics`` endpoint renders exactly these names, so a dashboard works the same whether
Prometheus scrapes the agent or receives data through a collector.

One deliberate choice: gauges whose value is a fraction use unit ``1``. The collector maps
that to a ``_ratio`` suffix while the Python Prometheus exporter adds nothing; the agent's
endpoint follows the collector so the two paths agree. Gauges that are states (up, active)
have no unit at all, which every path leaves without a suffix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    GAUGE = "gauge"
    COUNTER = "counter"  # monotonic sum
    UPDOWNCOUNTER = "updowncounter"  # non-monotonic sum
    HISTOGRAM = "histogram"


# Identity on every GPU and workload data point (not only on the resource), so the same
# PromQL works for a direct scrape and for the collector path.
IDENTITY = ("rack", "node")
# What a rack, node or run id may be, wherever one is accepted (agent API, flags, baselines): safe as
# a file name and a label value.
IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
GPU_IDENTITY = ("rack", "node", "gpu")
GPU_ATTRS = (*GPU_IDENTITY, "hw.id", "hw.type", "hw.model")
WORKLOAD_ATTRS = (*GPU_IDENTITY, "model", "engine")


@dataclass(frozen=True)
class MetricDef:
    otel_name: str
    kind: Kind
    unit: str
    description: str
    attributes: tuple[str, ...]

    @property
    def prom_name(self) -> str:
        """Prometheus name as the collector's translator builds it (see ``prometheus_name``)."""
        return prometheus_name(self.otel_name, self.unit, self.kind)


# Semantic-convention bucket boundaries (GenAI metrics), in seconds.
OPERATION_DURATION_BUCKETS_S = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

# --- GPU hardware (agent) ---------------------------------------------------------------
HW_POWER = MetricDef("hw.power", Kind.GAUGE, "W", "GPU power draw", GPU_ATTRS)
HW_ENERGY = MetricDef(
    "hw.energy",
    Kind.COUNTER,
    "J",
    "GPU energy since the agent started sampling",
    (*GPU_ATTRS, "rackscope.energy.method"),
)
HW_GPU_MEMORY_USAGE = MetricDef("hw.gpu.memory.usage", Kind.UPDOWNCOUNTER, "By", "GPU memory used", GPU_ATTRS)
HW_GPU_MEMORY_LIMIT = MetricDef("hw.gpu.memory.limit", Kind.UPDOWNCOUNTER, "By", "GPU memory size", GPU_ATTRS)
HW_GPU_UTILIZATION = MetricDef(
    "hw.gpu.utilization", Kind.GAUGE, "1", "Fraction of time a kernel was running", GPU_ATTRS
)
HW_GPU_IO = MetricDef(
    "hw.gpu.io",
    Kind.COUNTER,
    "By",
    "Bytes moved over a GPU link",
    (*GPU_ATTRS, "network.io.direction", "link"),
)
HW_TEMPERATURE = MetricDef("hw.temperature", Kind.GAUGE, "Cel", "GPU core temperature", GPU_ATTRS)
HW_ERRORS = MetricDef("hw.errors", Kind.COUNTER, "{error}", "GPU errors by type", (*GPU_ATTRS, "error.type"))
GPU_POWER_LIMIT = MetricDef("rackscope.gpu.power.limit", Kind.GAUGE, "W", "Enforced GPU power limit", GPU_ATTRS)
# Hz, not MHz: the collector's translator has no word for "MHz" and would name it "..._MHz".
GPU_SM_CLOCK = MetricDef("rackscope.gpu.clock.sm", Kind.GAUGE, "Hz", "SM clock", GPU_ATTRS)
GPU_THROTTLE = MetricDef(
    "rackscope.gpu.throttle",
    Kind.GAUGE,
    "",
    "1 while a clock-event (throttle) reason is active",
    (*GPU_ATTRS, "reason"),
)
GPU_UP = MetricDef("rackscope.gpu.up", Kind.GAUGE, "", "1 when the GPU answered the last sample", GPU_ATTRS)

# --- agent health and identity -----------------------------------------------------------
NODE_INFO = MetricDef(
    "rackscope.node.info",
    Kind.GAUGE,
    "",
    'Node identity; simulated="true" for simulated hardware',
    (*IDENTITY, "source", "simulated", "gpu_model", "gpus", "version"),
)
COLLECTION_DURATION = MetricDef(
    "rackscope.agent.collection.duration", Kind.GAUGE, "s", "Time the last GPU sample took", IDENTITY
)
COLLECTION_ERRORS = MetricDef(
    "rackscope.agent.collection.errors", Kind.COUNTER, "{error}", "GPU samples that failed", IDENTITY
)
EXPORT_FAILURES = MetricDef(
    "rackscope.agent.export.failures",
    Kind.COUNTER,
    "{failure}",
    "OTLP exports that failed",
    (*IDENTITY, "exporter"),
)

# --- workload (runner, recorded through the OpenTelemetry API) ----------------------------
TOKENS = MetricDef(
    "rackscope.tokens",
    Kind.COUNTER,
    "{token}",
    "Tokens processed",
    (*WORKLOAD_ATTRS, "gen_ai.token.type"),
)
REQUESTS = MetricDef(
    "rackscope.requests",
    Kind.COUNTER,
    "{request}",
    "Requests finished, by outcome",
    (*WORKLOAD_ATTRS, "outcome"),
)
OPERATION_DURATION = MetricDef(
    "gen_ai.client.operation.duration", Kind.HISTOGRAM, "s", "End-to-end request latency", WORKLOAD_ATTRS
)
TIME_TO_FIRST_TOKEN = MetricDef(
    "gen_ai.server.time_to_first_token", Kind.HISTOGRAM, "s", "Time to first token", WORKLOAD_ATTRS
)
TIME_PER_OUTPUT_TOKEN = MetricDef(
    "gen_ai.server.time_per_output_token",
    Kind.HISTOGRAM,
    "s",
    "Time per output token after the first",
    WORKLOAD_ATTRS,
)
RUN_INFO = MetricDef(
    "rackscope.run.info",
    Kind.GAUGE,
    "",
    "1 while a run is active; identifies it",
    (*IDENTITY, "run_id", "scenario", "model", "engine"),
)

# --- the inference engine's own view (its metrics page, scraped by the agent) -------------
# One series per server and model, not per GPU: the engine counts for all the GPUs it drives.
ENGINE_ATTRS = (*IDENTITY, "model")
ENGINE_REQUESTS = MetricDef(
    "rackscope.engine.requests",
    Kind.GAUGE,
    "{request}",
    "Requests the inference server holds, by state (running: in a batch; waiting: queued)",
    (*ENGINE_ATTRS, "state"),
)
ENGINE_KV_CACHE_USAGE = MetricDef(
    "rackscope.engine.kv_cache.usage",
    Kind.GAUGE,
    "1",
    "Fraction of the inference server's KV cache in use (0-1)",
    ENGINE_ATTRS,
)
ENGINE_TOKENS = MetricDef(
    "rackscope.engine.tokens",
    Kind.COUNTER,
    "{token}",
    "Tokens the inference server counted (input: prompt; output: generated)",
    (*ENGINE_ATTRS, "gen_ai.token.type"),
)
ENGINE_UP = MetricDef(
    "rackscope.engine.up",
    Kind.GAUGE,
    "",
    "1 while the inference server's metrics page was read and understood recently; 0 when stale or failing",
    (*IDENTITY, "format"),
)
ENGINE_STATES = ("running", "waiting")  # values of the state attribute of rackscope.engine.requests

GPU_METRICS = (
    HW_POWER,
    HW_ENERGY,
    HW_GPU_MEMORY_USAGE,
    HW_GPU_MEMORY_LIMIT,
    HW_GPU_UTILIZATION,
    HW_GPU_IO,
    HW_TEMPERATURE,
    HW_ERRORS,
    GPU_POWER_LIMIT,
    GPU_SM_CLOCK,
    GPU_THROTTLE,
    GPU_UP,
)
AGENT_METRICS = (NODE_INFO, COLLECTION_DURATION, COLLECTION_ERRORS, EXPORT_FAILURES)
WORKLOAD_METRICS = (TOKENS, REQUESTS, OPERATION_DURATION, TIME_TO_FIRST_TOKEN, TIME_PER_OUTPUT_TOKEN, RUN_INFO)
ENGINE_METRICS = (ENGINE_REQUESTS, ENGINE_KV_CACHE_USAGE, ENGINE_TOKENS, ENGINE_UP)
ALL_METRICS = GPU_METRICS + AGENT_METRICS + WORKLOAD_METRICS + ENGINE_METRICS

# --- the OTel -> Prometheus name translation --------------------------------------------
# Mirrors the collector's translator (pkg/translator/prometheus, "normalize" with suffixes):
# dots to underscores, a unit suffix, "_total" on monotonic counters, "{...}" annotations
# dropped, "1" -> "_ratio" on gauges.
_UNIT_WORDS = {
    "d": "days",
    "h": "hours",
    "min": "minutes",
    "s": "seconds",
    "ms": "milliseconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "By": "bytes",
    "KiBy": "kibibytes",
    "MiBy": "mebibytes",
    "GiBy": "gibibytes",
    "KBy": "kilobytes",
    "MBy": "megabytes",
    "GBy": "gigabytes",
    "m": "meters",
    "V": "volts",
    "A": "amperes",
    "J": "joules",
    "W": "watts",
    "g": "grams",
    "Cel": "celsius",
    "Hz": "hertz",
    "%": "percent",
}
_INVALID = re.compile(r"[^a-zA-Z0-9_]+")


def prometheus_name(otel_name: str, unit: str, kind: Kind) -> str:
    """The Prometheus name the collector (and Prometheus's OTLP receiver) give a metric."""
    name = _INVALID.sub("_", otel_name).strip("_")
    unit = re.sub(r"\{[^}]*\}", "", unit).strip()
    suffix = ""
    if unit == "1":
        suffix = "ratio" if kind is Kind.GAUGE else ""
    elif unit:
        suffix = _UNIT_WORDS.get(unit, _INVALID.sub("_", unit).strip("_"))
    if suffix and not name.endswith("_" + suffix):
        name = f"{name}_{suffix}"
    if kind is Kind.COUNTER and not name.endswith("_total"):
        name += "_total"
    return name


def prometheus_label(attribute: str) -> str:
    """Attribute key -> Prometheus label name (dots and other characters to underscores)."""
    label = _INVALID.sub("_", attribute)
    return f"key_{label}" if label[:1].isdigit() else label


BY_OTEL_NAME = {m.otel_name: m for m in ALL_METRICS}
