"""The simulated GPU: datasheet profiles and a small physical model shared by the agent's
simulated GPU source (which reads it) and the runner's simulated engine (which loads it).

Sources for the profiles (all public):
- power limits and HBM sizes: NVIDIA datasheets (H100 SXM 700 W / 80 GB, H200 700 W / 141 GB,
  B200 1,000 W / 180 GB, GB200 1,200 W / 186 GB, GB300 1,400 W / 288 GB).
- Llama2-70B offline output tokens/s per GPU: MLPerf Inference v4.1 (8xH100 24,524.9),
  v5.0 (8xH200 34,988.2), v5.1 (8xB200 101,527); Azure ND GB200 v6 rack (865,000 / 72) and
  ND GB300 v6 rack (1,100,948.3 / 72, Nov 2025).
- NVLink: 900 GB/s per GPU on Hopper (NVLink 4), 1.8 TB/s on Blackwell (NVLink 5), half of
  it each direction.
Idle power, clocks and thermal constants are round figures typical of these parts; they
shape the curves, not the headline numbers.

Model, per GPU:
- ``utilization`` in [0, 1] is set by whoever drives the GPU (the simulated engine, or a
  configured constant load). Power = idle + (busy - idle) * utilization ** 0.8, held under
  the enforced limit (and an injected cap).
- Energy is the exact integral of that piecewise-constant power: every change of load, cap
  or fault first integrates up to now.
- A power cap lowers the clock until power fits (dynamic power ~ f ** 2.5); a thermal
  throttle cuts the clock to 70 %; an NVLink degradation cuts link bandwidth to 40 % and
  tensor-parallel throughput to 85 %. ``speed()`` is the resulting throughput factor the
  engine applies, together with the node's seeded variation.
- Temperature relaxes towards ambient + power * thermal resistance with a 20 s time constant.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

from rackscope.clock import Clock

GIB = 1 << 30


@dataclass(frozen=True)
class GpuProfile:
    key: str
    name: str
    power_limit_w: float
    idle_power_w: float
    hbm_bytes: int
    llama2_70b_tokens_per_s: float  # published offline output tokens/s per GPU
    sm_clock_max_mhz: float
    nvlink_bytes_per_s: float  # per direction
    source: str


PROFILES: dict[str, GpuProfile] = {
    p.key: p
    for p in (
        GpuProfile(
            "h100",
            "NVIDIA H100 80GB HBM3",
            700.0,
            70.0,
            80 * GIB,
            24_524.9 / 8,
            1980.0,
            450e9,
            "MLPerf Inference v4.1, 8xH100 SXM, Llama2-70B Offline 24,524.9 tokens/s",
        ),
        GpuProfile(
            "h200",
            "NVIDIA H200",
            700.0,
            75.0,
            141 * GIB,
            34_988.2 / 8,
            1980.0,
            450e9,
            "MLPerf Inference v5.0, 8xH200, Llama2-70B Offline 34,988.2 tokens/s",
        ),
        GpuProfile(
            "b200",
            "NVIDIA B200",
            1000.0,
            140.0,
            180 * GIB,
            101_527.0 / 8,
            1965.0,
            900e9,
            "MLPerf Inference v5.1, 8xB200, Llama2-70B Offline 101,527 tokens/s",
        ),
        GpuProfile(
            "gb200",
            "NVIDIA GB200",
            1200.0,
            160.0,
            186 * GIB,
            865_000.0 / 72,
            2062.0,
            900e9,
            "Azure ND GB200 v6 NVL72 rack, Llama2-70B Offline 865,000 tokens/s",
        ),
        GpuProfile(
            "gb300",
            "NVIDIA GB300",
            1400.0,
            180.0,
            288 * GIB,
            1_100_948.3 / 72,
            2032.0,
            900e9,
            "Azure ND GB300 v6 NVL72 rack, Llama2-70B Offline 1,100,948.3 tokens/s (MLPerf v5.1)",
        ),
    )
}

AMBIENT_C = 30.0
THERMAL_RESISTANCE_C_PER_W = 0.035  # °C above ambient per watt at steady state
THERMAL_TIME_CONSTANT_S = 20.0
THROTTLE_TEMPERATURE_C = 92.0
BUSY_POWER_FRACTION = 0.96  # a saturated inference GPU sits just under its limit
THERMAL_THROTTLE_CLOCK = 0.70
NVLINK_DEGRADED_BANDWIDTH = 0.40
NVLINK_DEGRADED_SPEED = 0.85
# Link-layer error rates of a degraded link (errors/s, summed over the GPU's links): CRC errors
# cause replays, and a few bursts force a link retrain (recovery). A healthy link counts none.
NVLINK_DEGRADED_CRC_PER_S = 40.0
NVLINK_DEGRADED_REPLAY_PER_S = 8.0
NVLINK_DEGRADED_RECOVERY_PER_S = 0.5
DYNAMIC_POWER_EXPONENT = 2.5  # dynamic power ~ f * V^2, V ~ f^0.75

# NVML clock-event reason bits (nvmlClocksEventReason*), so sim and NVML samples agree.
CLOCK_EVENT_GPU_IDLE = 0x1
CLOCK_EVENT_SW_POWER_CAP = 0x4
CLOCK_EVENT_HW_SLOWDOWN = 0x8
CLOCK_EVENT_SW_THERMAL = 0x20
CLOCK_EVENT_HW_THERMAL = 0x40


def profile(key: str) -> GpuProfile:
    try:
        return PROFILES[key.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU model {key!r}; choose one of {', '.join(PROFILES)}") from None


def seeded_rng(*parts: object) -> random.Random:
    """A random generator seeded from names, stable across processes and Python versions."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def node_variation(rack: str, node: str, seed: int = 0) -> float:
    """Seeded throughput factor of a node around 1.0.

    Shaped like the Azure GB300 rack: most nodes within ~2 % above the mean, a tail of slower
    ones, about 8 % between slowest and fastest over 18 nodes.
    """
    rng = seeded_rng("node", rack, node, seed)
    return 1.024 - abs(rng.gauss(0.0, 0.03))


@dataclass
class Faults:
    power_cap_w: float | None = None
    thermal_throttle: bool = False
    nvlink_degraded: bool = False
    dropped: bool = False  # the GPU stops answering (falls off the bus)

    def as_dict(self) -> dict[str, object]:
        return {
            "power_cap_w": self.power_cap_w,
            "thermal_throttle": self.thermal_throttle,
            "nvlink_degraded": self.nvlink_degraded,
            "dropped": self.dropped,
        }


@dataclass
class SimGpu:
    """One simulated GPU. Everything that changes power integrates energy first."""

    index: int
    profile: GpuProfile
    clock: Clock
    variation: float = 1.0
    uuid: str = ""
    faults: Faults = field(default_factory=Faults)
    utilization: float = 0.0
    weights_bytes: int = 0
    kv_bytes: int = 0
    nvlink_tx_bytes_per_s: float = 0.0
    nvlink_rx_bytes_per_s: float = 0.0
    energy_j: float = 0.0
    nvlink_tx_bytes: float = 0.0
    nvlink_rx_bytes: float = 0.0
    temperature_c: float = AMBIENT_C
    xid_errors: int = 0
    last_xid: int | None = None
    nvlink_crc_errors: float = 0.0  # since start; whole counts are reported
    nvlink_replay_errors: float = 0.0
    nvlink_recovery_errors: float = 0.0
    _t: float = field(default=-1.0, repr=False)

    def __post_init__(self) -> None:
        self._t = self.clock.now()
        if not self.uuid:
            rng = seeded_rng("uuid", self.profile.key, self.index, id(self))
            self.uuid = f"GPU-sim-{rng.getrandbits(64):016x}"
        self.temperature_c = AMBIENT_C + self.power_w() * THERMAL_RESISTANCE_C_PER_W

    # --- physics -------------------------------------------------------------------------
    def enforced_limit_w(self) -> float:
        cap = self.faults.power_cap_w
        return min(self.profile.power_limit_w, cap) if cap is not None else self.profile.power_limit_w

    def _demand_w(self) -> float:
        p = self.profile
        busy = p.power_limit_w * BUSY_POWER_FRACTION
        return p.idle_power_w + (busy - p.idle_power_w) * math.pow(max(0.0, self.utilization), 0.8)

    def clock_factor(self) -> float:
        """SM clock as a fraction of its maximum, after power cap and thermal throttle."""
        factor = 1.0
        demand, limit, idle = self._demand_w(), self.enforced_limit_w(), self.profile.idle_power_w
        if demand > limit and demand > idle:
            factor = math.pow(max(limit - idle, 1.0) / (demand - idle), 1.0 / DYNAMIC_POWER_EXPONENT)
        if self.faults.thermal_throttle:
            factor *= THERMAL_THROTTLE_CLOCK
        return factor

    def power_w(self) -> float:
        if self.faults.dropped:
            return 0.0
        idle, demand = self.profile.idle_power_w, self._demand_w()
        dynamic = (demand - idle) * math.pow(self.clock_factor(), DYNAMIC_POWER_EXPONENT)
        return min(idle + dynamic, self.enforced_limit_w())

    def speed(self) -> float:
        """Throughput factor the engine applies: node variation x clock x link health."""
        if self.faults.dropped:
            return 0.0
        link = NVLINK_DEGRADED_SPEED if self.faults.nvlink_degraded else 1.0
        return self.variation * self.clock_factor() * link

    def throttle_reasons(self) -> int:
        reasons = 0
        if self.utilization <= 0.0:
            reasons |= CLOCK_EVENT_GPU_IDLE
        if self.faults.power_cap_w is not None and self._demand_w() > self.enforced_limit_w():
            reasons |= CLOCK_EVENT_SW_POWER_CAP
        if self.faults.thermal_throttle:
            reasons |= CLOCK_EVENT_HW_THERMAL | CLOCK_EVENT_SW_THERMAL
        return reasons

    def memory_used_bytes(self) -> int:
        overhead = 600 * (1 << 20)  # CUDA context and driver reservations
        return min(self.profile.hbm_bytes, overhead + self.weights_bytes + self.kv_bytes)

    def link_bandwidth_factor(self) -> float:
        return NVLINK_DEGRADED_BANDWIDTH if self.faults.nvlink_degraded else 1.0

    # --- time ----------------------------------------------------------------------------
    def advance(self) -> None:
        """Integrate energy, link bytes and temperature from the last update to now."""
        now = self.clock.now()
        dt = now - self._t
        if dt <= 0:
            return
        self._t = now
        power = self.power_w()
        self.energy_j += power * dt
        link = self.link_bandwidth_factor() * self.profile.nvlink_bytes_per_s
        if not self.faults.dropped:
            self.nvlink_tx_bytes += min(self.nvlink_tx_bytes_per_s, link) * dt
            self.nvlink_rx_bytes += min(self.nvlink_rx_bytes_per_s, link) * dt
            if self.faults.nvlink_degraded:
                self.nvlink_crc_errors += NVLINK_DEGRADED_CRC_PER_S * dt
                self.nvlink_replay_errors += NVLINK_DEGRADED_REPLAY_PER_S * dt
                self.nvlink_recovery_errors += NVLINK_DEGRADED_RECOVERY_PER_S * dt
        target = AMBIENT_C + power * THERMAL_RESISTANCE_C_PER_W
        if self.faults.thermal_throttle:
            target = max(target, THROTTLE_TEMPERATURE_C)
        self.temperature_c = target + (self.temperature_c - target) * math.exp(-dt / THERMAL_TIME_CONSTANT_S)

    def set_load(
        self,
        utilization: float,
        kv_bytes: int | None = None,
        nvlink_tx_bytes_per_s: float | None = None,
        nvlink_rx_bytes_per_s: float | None = None,
    ) -> None:
        """Called by the engine whenever the work it puts on this GPU changes."""
        self.advance()
        self.utilization = min(1.0, max(0.0, utilization))
        if kv_bytes is not None:
            self.kv_bytes = max(0, kv_bytes)
        if nvlink_tx_bytes_per_s is not None:
            self.nvlink_tx_bytes_per_s = max(0.0, nvlink_tx_bytes_per_s)
        if nvlink_rx_bytes_per_s is not None:
            self.nvlink_rx_bytes_per_s = max(0.0, nvlink_rx_bytes_per_s)

    def set_faults(self, **changes: object) -> None:
        """Change faults (keys of ``Faults``); integrates first so energy stays exact."""
        self.advance()
        for key, value in changes.items():
            if not hasattr(self.faults, key):
                raise ValueError(f"unknown fault {key!r}")
            setattr(self.faults, key, value)
        if changes.get("dropped"):
            self.xid_errors += 1
            self.last_xid = 79  # "GPU has fallen off the bus"


def make_node_gpus(
    gpu_model: str, count: int, clock: Clock, rack: str = "r1", node: str = "n01", seed: int = 0
) -> list[SimGpu]:
    """The GPUs of one simulated node, with seeded node and per-GPU variation."""
    prof = profile(gpu_model)
    node_factor = node_variation(rack, node, seed)
    gpus = []
    for i in range(count):
        rng = seeded_rng("gpu", rack, node, i, seed)
        uuid = f"GPU-sim-{rng.getrandbits(128):032x}"
        gpus.append(SimGpu(i, prof, clock, variation=node_factor * (1.0 + rng.gauss(0.0, 0.003)), uuid=uuid))
    return gpus
