"""The GPU series table both export paths read: which contract metric each sample field
feeds, with which extra attributes, plus the node identity and the per-tick snapshot."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rackscope import contract
from rackscope.agent.sources.base import NVLINK_ERROR_TYPES, THROTTLE_REASONS, GpuInfo, GpuSample
from rackscope.contract import MetricDef

Number = int | float
ValueGetter = Callable[[GpuSample, GpuInfo], Number | None]

GPU_TYPE = "gpu"  # value of the hw.type attribute


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Who this agent is: labels of rackscope.node.info and identity of every series."""

    rack: str
    node: str
    source: str
    simulated: bool
    gpu_model: str
    version: str

    @classmethod
    def coerce(cls, identity: NodeIdentity | Mapping[str, object]) -> NodeIdentity:
        """Accepts the dataclass or a mapping with the same keys (``simulated`` a bool)."""
        if isinstance(identity, NodeIdentity):
            return identity
        return cls(
            rack=str(identity["rack"]),
            node=str(identity["node"]),
            source=str(identity["source"]),
            simulated=bool(identity["simulated"]),
            gpu_model=str(identity["gpu_model"]),
            version=str(identity["version"]),
        )


@dataclass(frozen=True, slots=True)
class GpuSeries:
    """One series per GPU: a contract metric, the attributes it adds to the GPU identity
    (in contract order), and how to read its value from a sample (None: no data point)."""

    metric: MetricDef
    extra: tuple[tuple[str, str], ...]
    value: ValueGetter


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The latest tick as the exporters see it; immutable so readers on other threads can
    hold it without a lock. ``samples`` is aligned with ``infos``; None where a GPU gave no
    sample this tick."""

    infos: tuple[GpuInfo, ...]
    samples: tuple[GpuSample | None, ...]
    collection_duration_s: float | None
    collection_errors: int  # cumulative
    generation: int


EMPTY_SNAPSHOT = Snapshot((), (), None, 0, 0)


def _energy(method: str) -> ValueGetter:
    # One static series per method keeps label sets pre-renderable; only the one matching
    # the sample's method carries a value.
    def get(s: GpuSample, _info: GpuInfo) -> Number | None:
        return s.energy_j if s.energy_method == method else None

    return get


def _throttle(bit: int) -> ValueGetter:
    def get(s: GpuSample, _info: GpuInfo) -> Number | None:
        mask = s.throttle_reasons
        if mask is None:
            return None
        return 1 if mask & bit else 0

    return get


def _field(name: str) -> ValueGetter:
    def get(s: GpuSample, _info: GpuInfo) -> Number | None:
        value: Number | None = getattr(s, name)
        return value

    return get


def _memory_limit(s: GpuSample, info: GpuInfo) -> Number | None:
    # Static per GPU: the source may report it once (GpuInfo) rather than every tick.
    return s.memory_total_bytes if s.memory_total_bytes is not None else info.memory_total_bytes


def _power_limit(s: GpuSample, info: GpuInfo) -> Number | None:
    return s.power_limit_w if s.power_limit_w is not None else info.power_limit_w


def _sm_clock_hz(s: GpuSample, _info: GpuInfo) -> Number | None:
    return s.sm_clock_mhz * 1e6 if s.sm_clock_mhz is not None else None  # the contract's unit is Hz


def _up(s: GpuSample, _info: GpuInfo) -> Number | None:
    return 1 if s.ok else 0


ENERGY_METHODS = ("counter", "integrated")
IO_LINKS = (
    ("transmit", "nvlink", "nvlink_tx_bytes"),
    ("receive", "nvlink", "nvlink_rx_bytes"),
    ("transmit", "pcie", "pcie_tx_bytes"),
    ("receive", "pcie", "pcie_rx_bytes"),
)
# hw.errors series: their extra attributes (contract order) and the sample field each counts.
# error.type follows the hardware conventions: "corrected" / "uncorrected" for ECC memory errors,
# the error's own name for a link ("crc", "replay", "recovery", with link="nvlink"), and "xid"
# for the driver's XID events (the XID code itself would make a series per code).
NVLINK = "nvlink"
ERROR_SERIES: tuple[tuple[tuple[tuple[str, str], ...], str], ...] = (
    ((("error.type", "xid"),), "xid_errors"),
    ((("error.type", "corrected"),), "ecc_corrected"),
    ((("error.type", "uncorrected"),), "ecc_uncorrected"),
    *(((("error.type", t), ("link", NVLINK)), f) for t, f in NVLINK_ERROR_TYPES),
)

GPU_SERIES: tuple[GpuSeries, ...] = (
    GpuSeries(contract.HW_POWER, (), _field("power_w")),
    *(GpuSeries(contract.HW_ENERGY, (("rackscope.energy.method", m),), _energy(m)) for m in ENERGY_METHODS),
    GpuSeries(contract.HW_GPU_MEMORY_USAGE, (), _field("memory_used_bytes")),
    GpuSeries(contract.HW_GPU_MEMORY_LIMIT, (), _memory_limit),
    GpuSeries(contract.HW_GPU_UTILIZATION, (), _field("utilization")),
    *(
        GpuSeries(contract.HW_GPU_IO, (("network.io.direction", d), ("link", link)), _field(f))
        for d, link, f in IO_LINKS
    ),
    GpuSeries(contract.HW_TEMPERATURE, (), _field("temperature_c")),
    *(GpuSeries(contract.HW_ERRORS, extra, _field(f)) for extra, f in ERROR_SERIES),
    GpuSeries(contract.GPU_POWER_LIMIT, (), _power_limit),
    GpuSeries(contract.GPU_SM_CLOCK, (), _sm_clock_hz),
    *(GpuSeries(contract.GPU_THROTTLE, (("reason", name),), _throttle(bit)) for bit, name in THROTTLE_REASONS.items()),
    GpuSeries(contract.GPU_UP, (), _up),
)


def series_by_metric() -> list[tuple[MetricDef, tuple[GpuSeries, ...]]]:
    """GPU_SERIES grouped by metric, in GPU_METRICS order (a text family must be contiguous)."""
    return [(m, tuple(s for s in GPU_SERIES if s.metric is m)) for m in contract.GPU_METRICS]


def gpu_attributes(identity: NodeIdentity, info: GpuInfo) -> tuple[tuple[str, str], ...]:
    """The GPU_ATTRS of one GPU, in contract order."""
    return (
        ("rack", identity.rack),
        ("node", identity.node),
        ("gpu", str(info.index)),
        ("hw.id", info.uuid),
        ("hw.type", GPU_TYPE),
        ("hw.model", info.model),
    )


def node_info_attributes(identity: NodeIdentity, gpus: int) -> tuple[tuple[str, str], ...]:
    return (
        ("rack", identity.rack),
        ("node", identity.node),
        ("source", identity.source),
        ("simulated", "true" if identity.simulated else "false"),
        ("gpu_model", identity.gpu_model),
        ("gpus", str(gpus)),
        ("version", identity.version),
    )


def is_up(sample: GpuSample | None) -> bool:
    return sample is not None and sample.ok
