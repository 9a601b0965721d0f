"""What every GPU source produces: static GPU identity and one sample per GPU per tick."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from rackscope.agent.sources.counters import is_valid_reading

log = logging.getLogger(__name__)

N = TypeVar("N", int, float)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What does not change while the agent runs."""

    index: int
    uuid: str
    model: str  # marketing name as the driver reports it, e.g. "NVIDIA H100 80GB HBM3"
    memory_total_bytes: int | None = None
    power_limit_w: float | None = None
    simulated: bool = False


@dataclass(slots=True)
class GpuSample:
    """One reading of one GPU. ``None`` means the GPU or source does not report the field;
    it is never replaced by zero.

    Counters (energy, link bytes, error counts) are cumulative since the source started
    (or since driver load where the hardware counter is used), so Prometheus ``rate()``
    works on them directly.
    """

    index: int
    timestamp_s: float  # wall-clock seconds (time.time()) when taken
    ok: bool = True  # False when the GPU did not answer this tick
    error: str | None = None
    power_w: float | None = None
    energy_j: float | None = None
    energy_method: str = "counter"  # "counter" (hardware) or "integrated" (sum of power x dt)
    power_limit_w: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization: float | None = None  # fraction 0..1
    sm_clock_mhz: float | None = None
    temperature_c: float | None = None
    throttle_reasons: int | None = None  # NVML clock-event reason bitmask
    nvlink_tx_bytes: int | None = None
    nvlink_rx_bytes: int | None = None
    pcie_tx_bytes: int | None = None
    pcie_rx_bytes: int | None = None
    xid_errors: int | None = None  # count of XID events seen
    last_xid: int | None = None
    ecc_corrected: int | None = None
    ecc_uncorrected: int | None = None
    # NVLink link-layer errors since driver load, summed over the GPU's links.
    nvlink_crc_errors: int | None = None  # CRC errors in flits and in data
    nvlink_replay_errors: int | None = None  # packets sent again after an error
    nvlink_recovery_errors: int | None = None  # link retrained after errors
    extra: dict[str, float] = field(default_factory=dict)


# Every numeric reading of a GpuSample: each is finite and non-negative when valid.
READING_FIELDS = (
    "power_w",
    "energy_j",
    "power_limit_w",
    "memory_used_bytes",
    "memory_total_bytes",
    "utilization",
    "sm_clock_mhz",
    "temperature_c",
    "throttle_reasons",
    "nvlink_tx_bytes",
    "nvlink_rx_bytes",
    "pcie_tx_bytes",
    "pcie_rx_bytes",
    "xid_errors",
    "last_xid",
    "ecc_corrected",
    "ecc_uncorrected",
    "nvlink_crc_errors",
    "nvlink_replay_errors",
    "nvlink_recovery_errors",
)

# The hw.errors ``error.type`` values of NVLink errors and the sample field each counts. The
# hardware conventions name the error itself ("crc", as for any link); the series also carry
# ``link="nvlink"``, which is how alerts select NVLink errors.
NVLINK_ERROR_TYPES = (
    ("crc", "nvlink_crc_errors"),
    ("replay", "nvlink_replay_errors"),
    ("recovery", "nvlink_recovery_errors"),
)


# NVML clock-event (throttle) reason bits and the names the agent exports them under.
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}


def throttle_names(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_REASONS.items() if mask & bit]


@runtime_checkable
class GpuSource(Protocol):
    """A source of GPU samples. ``open`` raises ``SourceUnavailable`` (with a hint) when the
    backend cannot run here; ``sample`` never raises for one failing GPU: that GPU's sample
    has ``ok=False`` and the others carry on."""

    name: str
    simulated: bool

    def open(self) -> list[GpuInfo]: ...

    def sample(self) -> list[GpuSample]: ...

    def interrupt(self) -> None:
        """Shutdown has begun: a read of a peer in progress ends now (its samples fail) and later
        samples wait on no peer for long. Callable from any thread, more than once."""

    def close(self) -> None: ...


class OnceLogger:
    """Logs a message once per key: an unsupported field is worth one line, not one a second."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._seen: set[tuple[object, ...]] = set()

    def warn(self, key: tuple[object, ...], message: str, *args: object) -> None:
        if key not in self._seen:
            self._seen.add(key)
            self._logger.warning(message, *args)


class ReadingCheck:
    """Turns invalid readings (negative, NaN, infinite) into ``None``: a wrong number is worse
    than a missing one. Each GPU and field is logged once, however often it repeats."""

    def __init__(self, logger: logging.Logger) -> None:
        self._once = OnceLogger(logger)

    def __call__(self, gpu: int, what: str, value: N | None) -> N | None:
        if value is None or is_valid_reading(value):
            return value
        self._once.warn(("invalid", gpu, what), "GPU %d: invalid reading %s=%r; reported as missing", gpu, what, value)
        return None

    def sweep(self, sample: GpuSample) -> None:
        """Checks every reading of ``sample`` in place."""
        for name in READING_FIELDS:
            value = getattr(sample, name)
            if value is not None and not is_valid_reading(value):
                setattr(sample, name, self(sample.index, name, value))
