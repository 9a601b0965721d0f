"""Constructed GPU samples and the series they must produce, written out by hand (not derived
from the code under test), plus the expected OTel kinds and Prometheus names."""

from __future__ import annotations

from typing import Any

from rackscope.agent.sources.base import GpuInfo, GpuSample
from rackscope.agent.telemetry import NodeIdentity

GIB = 1 << 30

IDENTITY = NodeIdentity(rack="r1", node="n01", source="sim", simulated=True, gpu_model="gb300", version="0.1.0")

INFOS = [
    GpuInfo(0, "GPU-0000-aaaa", "NVIDIA GB300", 288 * GIB, 1400.0, True),
    GpuInfo(1, "GPU-1111-bbbb", "NVIDIA GB300", 288 * GIB, 1400.0, True),
    GpuInfo(2, "GPU-2222-cccc", "NVIDIA GB300", 288 * GIB, 1400.0, True),
    GpuInfo(3, "GPU-3333-dddd", "NVIDIA GB300", 288 * GIB, 1400.0, True),
]


def samples(now_s: float = 1_700_000_000.0) -> list[GpuSample]:
    """GPU 0 reports everything, GPU 1 a subset, GPU 2 is down, GPU 3 gives no sample."""
    return [
        GpuSample(
            index=0, timestamp_s=now_s, power_w=612.25, energy_j=123456.5, energy_method="counter",
            power_limit_w=1350.0, memory_used_bytes=100 * GIB, memory_total_bytes=288 * GIB, utilization=0.875,
            sm_clock_mhz=1980.0, temperature_c=71.5, throttle_reasons=0x4 | 0x40,
            nvlink_tx_bytes=5_000_000_000_000, nvlink_rx_bytes=4_000_000_000_000,
            pcie_tx_bytes=1_000_000_000, pcie_rx_bytes=2_000_000_000,
            xid_errors=2, last_xid=79, ecc_corrected=3, ecc_uncorrected=0,
        ),
        GpuSample(
            index=1, timestamp_s=now_s, power_w=150.0, energy_j=42.0, energy_method="integrated",
            memory_used_bytes=1 * GIB, nvlink_tx_bytes=10, nvlink_rx_bytes=20, xid_errors=0,
        ),
        GpuSample(index=2, timestamp_s=now_s, ok=False, error="GPU has fallen off the bus"),
    ]


THROTTLE_NAMES = (
    "gpu_idle", "applications_clocks", "sw_power_cap", "hw_slowdown", "sync_boost", "sw_thermal", "hw_thermal",
    "hw_power_brake", "display_clocks",
)

# (OTel name, extra attributes) -> value, per GPU index. Absent entries must not be exported.
EXPECTED_GPU: dict[int, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {
    0: {
        ("hw.power", ()): 612.25,
        ("hw.energy", (("rackscope.energy.method", "counter"),)): 123456.5,
        ("hw.gpu.memory.usage", ()): 100 * GIB,
        ("hw.gpu.memory.limit", ()): 288 * GIB,
        ("hw.gpu.utilization", ()): 0.875,
        ("hw.gpu.io", (("network.io.direction", "transmit"), ("link", "nvlink"))): 5_000_000_000_000,
        ("hw.gpu.io", (("network.io.direction", "receive"), ("link", "nvlink"))): 4_000_000_000_000,
        ("hw.gpu.io", (("network.io.direction", "transmit"), ("link", "pcie"))): 1_000_000_000,
        ("hw.gpu.io", (("network.io.direction", "receive"), ("link", "pcie"))): 2_000_000_000,
        ("hw.temperature", ()): 71.5,
        ("hw.errors", (("error.type", "xid"),)): 2,
        ("hw.errors", (("error.type", "corrected"),)): 3,
        ("hw.errors", (("error.type", "uncorrected"),)): 0,
        ("rackscope.gpu.power.limit", ()): 1350.0,
        ("rackscope.gpu.clock.sm", ()): 1.98e9,  # Hz
        **{
            ("rackscope.gpu.throttle", (("reason", name),)): 1 if name in ("sw_power_cap", "hw_thermal") else 0
            for name in THROTTLE_NAMES
        },
        ("rackscope.gpu.up", ()): 1,
    },
    1: {
        ("hw.power", ()): 150.0,
        ("hw.energy", (("rackscope.energy.method", "integrated"),)): 42.0,
        ("hw.gpu.memory.usage", ()): 1 * GIB,
        ("hw.gpu.memory.limit", ()): 288 * GIB,  # from GpuInfo: the sample does not repeat it
        ("hw.gpu.io", (("network.io.direction", "transmit"), ("link", "nvlink"))): 10,
        ("hw.gpu.io", (("network.io.direction", "receive"), ("link", "nvlink"))): 20,
        ("hw.errors", (("error.type", "xid"),)): 0,
        ("rackscope.gpu.power.limit", ()): 1400.0,  # from GpuInfo
        ("rackscope.gpu.up", ()): 1,
    },
    2: {("rackscope.gpu.up", ()): 0},
    3: {("rackscope.gpu.up", ()): 0},
}


def gpu_base_attributes(info: GpuInfo) -> dict[str, str]:
    return {"rack": "r1", "node": "n01", "gpu": str(info.index), "hw.id": info.uuid, "hw.type": "gpu",
            "hw.model": info.model}


def expected_gpu_points() -> dict[tuple[str, frozenset[tuple[str, Any]]], float]:
    """(OTel name, full attribute set) -> value for every GPU series."""
    out: dict[tuple[str, frozenset[tuple[str, Any]]], float] = {}
    for info in INFOS:
        base = gpu_base_attributes(info)
        for (name, extra), value in EXPECTED_GPU[info.index].items():
            out[(name, frozenset({**base, **dict(extra)}.items()))] = value
    return out


# OTel name -> (unit, OTLP data kind, monotonic) as the contract and semantic conventions say.
KINDS: dict[str, tuple[str, str, bool | None]] = {
    "hw.power": ("W", "gauge", None),
    "hw.energy": ("J", "sum", True),
    "hw.gpu.memory.usage": ("By", "sum", False),
    "hw.gpu.memory.limit": ("By", "sum", False),
    "hw.gpu.utilization": ("1", "gauge", None),
    "hw.gpu.io": ("By", "sum", True),
    "hw.temperature": ("Cel", "gauge", None),
    "hw.errors": ("{error}", "sum", True),
    "rackscope.gpu.power.limit": ("W", "gauge", None),
    "rackscope.gpu.clock.sm": ("Hz", "gauge", None),
    "rackscope.gpu.throttle": ("", "gauge", None),
    "rackscope.gpu.up": ("", "gauge", None),
    "rackscope.node.info": ("", "gauge", None),
    "rackscope.agent.collection.duration": ("s", "gauge", None),
    "rackscope.agent.collection.errors": ("{error}", "sum", True),
    "rackscope.agent.export.failures": ("{failure}", "sum", True),
    "rackscope.tokens": ("{token}", "sum", True),
    "rackscope.requests": ("{request}", "sum", True),
    "gen_ai.client.operation.duration": ("s", "histogram", None),
    "gen_ai.client.operation.time_to_first_chunk": ("s", "histogram", None),
    "rackscope.time_per_output_token": ("s", "histogram", None),
    "rackscope.run.info": ("", "gauge", None),
}

# The collector's (and Prometheus's OTLP receiver's) translation, applied by hand:
# dots to underscores, unit word (W watts, J joules, By bytes, Cel celsius, Hz hertz, s seconds),
# "{...}" units dropped, "_total" on monotonic sums, "_ratio" for unit "1" on gauges.
COLLECTOR_NAMES: dict[str, str] = {
    "hw.power": "hw_power_watts",
    "hw.energy": "hw_energy_joules_total",
    "hw.gpu.memory.usage": "hw_gpu_memory_usage_bytes",
    "hw.gpu.memory.limit": "hw_gpu_memory_limit_bytes",
    "hw.gpu.utilization": "hw_gpu_utilization_ratio",
    "hw.gpu.io": "hw_gpu_io_bytes_total",
    "hw.temperature": "hw_temperature_celsius",
    "hw.errors": "hw_errors_total",
    "rackscope.gpu.power.limit": "rackscope_gpu_power_limit_watts",
    "rackscope.gpu.clock.sm": "rackscope_gpu_clock_sm_hertz",
    "rackscope.gpu.throttle": "rackscope_gpu_throttle",
    "rackscope.gpu.up": "rackscope_gpu_up",
    "rackscope.node.info": "rackscope_node_info",
    "rackscope.agent.collection.duration": "rackscope_agent_collection_duration_seconds",
    "rackscope.agent.collection.errors": "rackscope_agent_collection_errors_total",
    "rackscope.agent.export.failures": "rackscope_agent_export_failures_total",
    "rackscope.tokens": "rackscope_tokens_total",
    "rackscope.requests": "rackscope_requests_total",
    "gen_ai.client.operation.duration": "gen_ai_client_operation_duration_seconds",
    "gen_ai.client.operation.time_to_first_chunk": "gen_ai_client_operation_time_to_first_chunk_seconds",
    "rackscope.time_per_output_token": "rackscope_time_per_output_token_seconds",
    "rackscope.run.info": "rackscope_run_info",
    "rackscope.engine.requests": "rackscope_engine_requests",
    "rackscope.engine.kv_cache.usage": "rackscope_engine_kv_cache_usage_ratio",
    "rackscope.engine.tokens": "rackscope_engine_tokens_total",
    "rackscope.engine.up": "rackscope_engine_up",
    "rackscope.engine.time_to_first_token": "rackscope_engine_time_to_first_token_seconds",
    "rackscope.engine.inter_token_latency": "rackscope_engine_inter_token_latency_seconds",
}

LABELS = {
    "hw.id": "hw_id",
    "hw.type": "hw_type",
    "hw.model": "hw_model",
    "network.io.direction": "network_io_direction",
    "error.type": "error_type",
    "rackscope.energy.method": "rackscope_energy_method",
    "gen_ai.token.type": "gen_ai_token_type",
    "gen_ai.operation.name": "gen_ai_operation_name",
    "gen_ai.provider.name": "gen_ai_provider_name",
    "gen_ai.request.model": "gen_ai_request_model",
}


def prom_labels(attributes: dict[str, Any] | frozenset[tuple[str, Any]]) -> frozenset[tuple[str, str]]:
    items = attributes.items() if isinstance(attributes, dict) else attributes
    return frozenset((LABELS.get(k, k), str(v)) for k, v in items)


def expected_prom_samples() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value in the Prometheus exposition for every GPU series."""
    return {
        (COLLECTOR_NAMES[name], prom_labels(attrs)): value for (name, attrs), value in expected_gpu_points().items()
    }
