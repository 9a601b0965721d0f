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
# gen_ai.client.operation.time_to_first_chunk: the client convention's boundaries, the same as
# the operation duration's (the server's time_to_first_token convention starts at 1 ms and stops
# at 10 s; an offline run's first tokens wait far longer than that in the queue).
TIME_TO_FIRST_CHUNK_BUCKETS_S = OPERATION_DURATION_BUCKETS_S
# rackscope.time_per_output_token: gen_ai.server.time_per_output_token's boundaries, the
# convention closest to what it measures.
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
HW_ERRORS = MetricDef(
    "hw.errors",
    Kind.COUNTER,
    "{error}",
    "GPU errors by type (xid, corrected, uncorrected; crc, replay, recovery on a link)",
    (*GPU_ATTRS, "error.type", "link"),
)
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
# GenAI semantic conventions (semantic-conventions-genai, status "development"): the gen_ai.*
# metrics carry the operation (gen_ai.operation.name), who served it (gen_ai.provider.name)
# and the model asked for (gen_ai.request.model), on top of the workload identity; model and
# engine stay for the dashboards, the recording rules and rackscope.run.info joins.
GENAI_ATTRS = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model")
GENAI_WORKLOAD_ATTRS = (*WORKLOAD_ATTRS, *GENAI_ATTRS)
# gen_ai.operation.name, from the conventions' well-known values: "chat" for the OpenAI chat
# completions API, "text_completion" for the (legacy) completions API and for the in-process
# engines, which continue the prompt as given, with no chat template applied.
OPERATION_CHAT = "chat"
OPERATION_TEXT_COMPLETION = "text_completion"
# gen_ai.provider.name per engine. The well-known values name hosted services (openai,
# anthropic, aws.bedrock, ...) and a custom value is allowed when none applies, which is so
# for every engine here: a self-hosted vLLM, SGLang or trtllm-serve behind the OpenAI API is
# not the "openai" service (that value also promises openai.* attributes these points lack),
# and the in-process engines are the serving software itself.
GENAI_PROVIDERS = {
    "sim": "rackscope.sim",
    "openai": "openai_compatible",
    "trtllm": "tensorrt_llm",
    "trtllm-bench": "tensorrt_llm",
    "hf": "transformers",
}


def genai_operation(engine: str, api: str | None = None) -> str:
    """gen_ai.operation.name of a run: ``api`` is the openai engine's API (``chat``/``completions``)."""
    return OPERATION_CHAT if engine == "openai" and api == "chat" else OPERATION_TEXT_COMPLETION


def genai_provider(engine: str) -> str:
    """gen_ai.provider.name of an engine (an engine not listed names itself)."""
    return GENAI_PROVIDERS.get(engine, engine)


OPERATION_DURATION = MetricDef(
    "gen_ai.client.operation.duration",
    Kind.HISTOGRAM,
    "s",
    "End-to-end request latency, successful requests",
    GENAI_WORKLOAD_ATTRS,
)
# Measured by the client, from sending the request to the first output token arriving: the
# conventions' client metric (a gen_ai.server.* metric is the server's own measurement).
TIME_TO_FIRST_CHUNK = MetricDef(
    "gen_ai.client.operation.time_to_first_chunk",
    Kind.HISTOGRAM,
    "s",
    "Time from sending a request to its first output token arriving, successful requests",
    GENAI_WORKLOAD_ATTRS,
)
# Not a semantic-convention metric, on purpose: the client convention,
# gen_ai.client.operation.time_per_output_chunk, records every gap between chunks, one value
# per chunk; this is one value per request, its mean time per output token after the first
# ((end - first token) / (output tokens - 1), MLPerf's TPOT), which is what TPOT limits and
# the load generators report, and it costs one observation per request instead of per chunk.
TIME_PER_OUTPUT_TOKEN = MetricDef(
    "rackscope.time_per_output_token",
    Kind.HISTOGRAM,
    "s",
    "Mean time per output token after the first, one value per successful request (TPOT)",
    GENAI_WORKLOAD_ATTRS,
)
# Prometheus histogram families renamed after 0.1.0: the old name and the metric that replaces
# it. The rule file records each old ..._bucket, _sum and _count from the new series until the
# next release (dashboards/rules.py, "rackscope.compat"; docs/dashboards.md, Migration).
RENAMED_HISTOGRAMS = (
    ("gen_ai_server_time_to_first_token_seconds", TIME_TO_FIRST_CHUNK),
    ("gen_ai_server_time_per_output_token_seconds", TIME_PER_OUTPUT_TOKEN),
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
# The server's own latency histograms, copied as the server counts them, with its own bucket
# boundaries (vLLM's, SGLang's): Prometheus ..._seconds_bucket/_sum/_count. The agent exports
# them through its pre-aggregated histogram registry (an OpenTelemetry histogram instrument can
# only record observations, not take over a server's cumulative buckets); runs also record
# their window percentiles (the record's server section).
ENGINE_TIME_TO_FIRST_TOKEN = MetricDef(
    "rackscope.engine.time_to_first_token",
    Kind.HISTOGRAM,
    "s",
    "Time to first token as the inference server measured it, in its own buckets",
    ENGINE_ATTRS,
)
ENGINE_INTER_TOKEN_LATENCY = MetricDef(
    "rackscope.engine.inter_token_latency",
    Kind.HISTOGRAM,
    "s",
    "Time between a request's successive output tokens as the inference server measured it, in its own buckets",
    ENGINE_ATTRS,
)
ENGINE_HISTOGRAMS = (ENGINE_TIME_TO_FIRST_TOKEN, ENGINE_INTER_TOKEN_LATENCY)

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
WORKLOAD_METRICS = (TOKENS, REQUESTS, OPERATION_DURATION, TIME_TO_FIRST_CHUNK, TIME_PER_OUTPUT_TOKEN, RUN_INFO)
ENGINE_METRICS = (ENGINE_REQUESTS, ENGINE_KV_CACHE_USAGE, ENGINE_TOKENS, ENGINE_UP, *ENGINE_HISTOGRAMS)
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
