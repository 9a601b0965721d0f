"""The simulated GPU source: samples read off the shared simulated-GPU model."""

from __future__ import annotations

import time

from rackscope.agent.sources.base import GpuInfo, GpuSample
from rackscope.simgpu import SimGpu


class SimSource:
    """Samples ``SimGpu`` objects. The same objects are loaded by the simulated engine, so
    power, memory, NVLink and temperature follow the work it carries."""

    name = "sim"
    simulated = True
    blocking = False  # sampling is arithmetic: the agent calls it on its event loop

    def __init__(self, gpus: list[SimGpu]) -> None:
        if not gpus:
            raise ValueError("a simulated node needs at least one GPU")
        self.gpus = gpus

    def open(self) -> list[GpuInfo]:
        return [
            GpuInfo(
                index=g.index,
                uuid=g.uuid,
                model=g.profile.name,
                memory_total_bytes=g.profile.hbm_bytes,
                power_limit_w=g.profile.power_limit_w,
                simulated=True,
            )
            for g in self.gpus
        ]

    def sample(self) -> list[GpuSample]:
        now = time.time()
        samples = []
        for g in self.gpus:
            g.advance()
            if g.faults.dropped:
                samples.append(GpuSample(index=g.index, timestamp_s=now, ok=False, error="GPU has fallen off the bus"))
                continue
            samples.append(
                GpuSample(
                    index=g.index,
                    timestamp_s=now,
                    power_w=g.power_w(),
                    energy_j=g.energy_j,
                    power_limit_w=g.enforced_limit_w(),
                    memory_used_bytes=g.memory_used_bytes(),
                    memory_total_bytes=g.profile.hbm_bytes,
                    utilization=g.utilization,
                    sm_clock_mhz=g.profile.sm_clock_max_mhz * g.clock_factor(),
                    temperature_c=g.temperature_c,
                    throttle_reasons=g.throttle_reasons(),
                    nvlink_tx_bytes=int(g.nvlink_tx_bytes),
                    nvlink_rx_bytes=int(g.nvlink_rx_bytes),
                    xid_errors=g.xid_errors,
                    last_xid=g.last_xid,
                    ecc_corrected=0,
                    ecc_uncorrected=0,
                    nvlink_crc_errors=int(g.nvlink_crc_errors),
                    nvlink_replay_errors=int(g.nvlink_replay_errors),
                    nvlink_recovery_errors=int(g.nvlink_recovery_errors),
                )
            )
        return samples

    def interrupt(self) -> None:
        """Nothing to abort: sampling waits on no peer."""

    def close(self) -> None:
        """Nothing to release."""
