"""Prometheus names the dashboards and rules query: contract metrics, their labels, and the
recording rules derived from them."""

from __future__ import annotations

from rackscope import contract
from rackscope.contract import prometheus_label

# --- contract metrics (names as both export paths give them) ----------------------------
POWER = contract.HW_POWER.prom_name
ENERGY = contract.HW_ENERGY.prom_name
MEMORY_USED = contract.HW_GPU_MEMORY_USAGE.prom_name
MEMORY_LIMIT = contract.HW_GPU_MEMORY_LIMIT.prom_name
UTILIZATION = contract.HW_GPU_UTILIZATION.prom_name
GPU_IO = contract.HW_GPU_IO.prom_name
TEMPERATURE = contract.HW_TEMPERATURE.prom_name
ERRORS = contract.HW_ERRORS.prom_name
POWER_LIMIT = contract.GPU_POWER_LIMIT.prom_name
SM_CLOCK = contract.GPU_SM_CLOCK.prom_name
THROTTLE = contract.GPU_THROTTLE.prom_name
GPU_UP = contract.GPU_UP.prom_name
NODE_INFO = contract.NODE_INFO.prom_name
COLLECTION_DURATION = contract.COLLECTION_DURATION.prom_name
TOKENS = contract.TOKENS.prom_name
REQUESTS = contract.REQUESTS.prom_name
RUN_INFO = contract.RUN_INFO.prom_name
TTFT_BUCKET = contract.TIME_TO_FIRST_CHUNK.prom_name + "_bucket"
TPOT_BUCKET = contract.TIME_PER_OUTPUT_TOKEN.prom_name + "_bucket"
DURATION_BUCKET = contract.OPERATION_DURATION.prom_name + "_bucket"
# The inference server's own view, scraped by the agent from the server's metrics page.
ENGINE_REQUESTS = contract.ENGINE_REQUESTS.prom_name
ENGINE_KV_CACHE = contract.ENGINE_KV_CACHE_USAGE.prom_name
ENGINE_TOKENS = contract.ENGINE_TOKENS.prom_name
ENGINE_UP = contract.ENGINE_UP.prom_name

# --- labels -------------------------------------------------------------------------------
TOKEN_TYPE = prometheus_label("gen_ai.token.type")
IO_DIRECTION = prometheus_label("network.io.direction")
ERROR_TYPE = prometheus_label("error.type")
LINK = "link"
REASON = "reason"
OUTCOME = "outcome"
STATE = "state"
ENGINE_FORMAT = "format"

# Label values the agent writes (agent/telemetry/series.py and agent/sources/base.py).
OUTPUT_TOKENS = f'{TOKEN_TYPE}="output"'
XID = f'{ERROR_TYPE}="xid"'
ECC = f'{ERROR_TYPE}=~"corrected|uncorrected"'
NVLINK_ERRORS = 'link="nvlink"'  # NVLink's error counters (error_type crc, replay, recovery)
POWER_THROTTLE_HW = f'{REASON}=~"hw_slowdown|hw_power_brake"'
POWER_THROTTLE_SW = f'{REASON}="sw_power_cap"'
THERMAL_THROTTLE = f'{REASON}=~"sw_thermal|hw_thermal"'
NVLINK = f'{LINK}="nvlink"'
WAITING = f'{STATE}="waiting"'

# --- recording rules (dashboards/rules/rackscope.rules.yml) ------------------------------
GPU_TPS = "rackscope:gpu_output_tokens_per_second"
NODE_TPS = "rackscope:node_output_tokens_per_second"
RACK_TPS = "rackscope:rack_output_tokens_per_second"
RACK_NODE_MEDIAN_TPS = "rackscope:rack_node_median_output_tokens_per_second"
GPU_POWER_W = "rackscope:gpu_power_watts"
NODE_POWER_W = "rackscope:node_power_watts"
RACK_POWER_KW = "rackscope:rack_power_kilowatts"
NODE_TPJ = "rackscope:node_tokens_per_joule"
RACK_TPJ = "rackscope:rack_tokens_per_joule"
RACK_NODE_MEDIAN_TPJ = "rackscope:rack_node_median_tokens_per_joule"
# Output tokens/s as the inference server counted them, and over what the client counted.
NODE_ENGINE_TPS = "rackscope:node_engine_output_tokens_per_second"
NODE_ENGINE_OVER_CLIENT = "rackscope:node_engine_to_client_output_tokens_ratio"
# Configured per rack in dashboards/rules/baselines.yml (`rackscope baseline set`, or by hand).
RACK_BASELINE_TPS = "rackscope:rack_baseline_output_tokens_per_second"
RACK_BASELINE_TPJ = "rackscope:rack_baseline_tokens_per_joule"

RECORDED = (
    GPU_TPS, NODE_TPS, RACK_TPS, RACK_NODE_MEDIAN_TPS, GPU_POWER_W, NODE_POWER_W, RACK_POWER_KW,
    NODE_TPJ, RACK_TPJ, RACK_NODE_MEDIAN_TPJ, NODE_ENGINE_TPS, NODE_ENGINE_OVER_CLIENT,
)

# --- renamed series, recorded under their old names until the next release -----------------
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# (old series, the series it is recorded from), for every renamed histogram family.
COMPAT = tuple(
    (old + suffix, metric.prom_name + suffix)
    for old, metric in contract.RENAMED_HISTOGRAMS
    for suffix in HISTOGRAM_SERIES
)
COMPAT_RECORDED = tuple(old for old, _ in COMPAT)

# Job names whose `up` the target-down alert watches (direct agent scrape, the collector,
# the Kubernetes ServiceMonitor all use a job starting with "rackscope").
JOB_PATTERN = "rackscope.*"
