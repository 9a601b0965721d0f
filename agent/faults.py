"""Fault injection on simulated nodes: what can be injected, parsing ``--inject`` specs, and
applying them to the simulated GPUs."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from rackscope.errors import ConfigError
from rackscope.simgpu import SimGpu


class FaultName(StrEnum):
    """Every fault that can be injected, declared once: the API's ``fault`` field, ``--inject``'s
    help and the checks below all derive from it. Each member's ``help`` says what it does, and
    what its VALUE means and defaults to."""

    help: str

    def __new__(cls, value: str, help_text: str) -> FaultName:
        member = str.__new__(cls, value)
        member._value_ = value
        member.help = help_text
        return member

    POWER_CAP = "power-cap", "cap GPU power at VALUE watts (default: 60 % of the GPU's limit)"
    THERMAL_THROTTLE = "thermal-throttle", "hold the GPU at its thermal limit, clocks cut to 70 %"
    NVLINK_DEGRADED = "nvlink-degraded", "NVLink bandwidth cut to 40 %, tensor-parallel throughput to 85 %"
    GPU_DROP = "gpu-drop", "the GPU falls off the bus (XID 79) and stops answering"
    ENGINE_SLOW = "engine-slow", "the simulated engine runs VALUE times slower (default 2.0)"


# name -> what it does; the value's meaning and default
FAULTS: dict[str, str] = {f.value: f.help for f in FaultName}
DEFAULT_POWER_CAP_FRACTION = 0.6
DEFAULT_ENGINE_SLOWDOWN = 2.0


@dataclass(frozen=True)
class Fault:
    name: str
    gpu: int | None = None  # None: every GPU of the node
    value: float | None = None

    def __post_init__(self) -> None:
        if self.name not in FAULTS:
            raise ConfigError(f"unknown fault {self.name!r}; choose one of {', '.join(FAULTS)}")
        if self.gpu is not None and self.gpu < 0:
            raise ConfigError(f"GPU index must not be negative, not {self.gpu}")
        if self.value is not None and not self.value > 0:
            raise ConfigError(f"fault value must be positive, not {self.value}")
        if self.name == FaultName.ENGINE_SLOW and self.gpu is not None:
            raise ConfigError("engine-slow applies to the whole node; give no GPU")


def parse_fault(spec: str) -> Fault:
    """``NAME[=VALUE][@GPU]``, e.g. ``power-cap=700@0``, ``thermal-throttle``, ``gpu-drop@3``."""
    rest, gpu = spec, None
    if "@" in rest:
        rest, _, gpu_text = rest.partition("@")
        try:
            gpu = int(gpu_text)
        except ValueError:
            raise ConfigError(f"bad GPU index in fault {spec!r}: expected NAME[=VALUE][@GPU]") from None
    name, _, value_text = rest.partition("=")
    value = None
    if value_text:
        try:
            value = float(value_text)
        except ValueError:
            raise ConfigError(f"bad value in fault {spec!r}: expected a number") from None
    return Fault(name.strip(), gpu, value)


def apply_fault(gpus: list[SimGpu], fault: Fault, clear: bool = False) -> list[int]:
    """Apply (or clear) a GPU fault; returns the GPU indexes touched. ``engine-slow`` is the
    engine's business and touches no GPU."""
    if fault.gpu is not None and fault.gpu >= len(gpus):
        raise ConfigError(f"GPU {fault.gpu} does not exist: this node has GPUs 0-{len(gpus) - 1}")
    targets = [gpus[fault.gpu]] if fault.gpu is not None else gpus
    for gpu in targets:
        if fault.name == FaultName.POWER_CAP:
            cap = fault.value if fault.value is not None else gpu.profile.power_limit_w * DEFAULT_POWER_CAP_FRACTION
            gpu.set_faults(power_cap_w=None if clear else cap)
        elif fault.name == FaultName.THERMAL_THROTTLE:
            gpu.set_faults(thermal_throttle=not clear)
        elif fault.name == FaultName.NVLINK_DEGRADED:
            gpu.set_faults(nvlink_degraded=not clear)
        elif fault.name == FaultName.GPU_DROP:
            gpu.set_faults(dropped=not clear)
        else:
            return []
    return [g.index for g in targets]


def clear_all(gpus: list[SimGpu]) -> None:
    for gpu in gpus:
        gpu.set_faults(power_cap_w=None, thermal_throttle=False, nvlink_degraded=False, dropped=False)
