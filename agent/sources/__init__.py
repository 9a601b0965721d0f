"""GPU sources behind one interface, and the choice between them at start-up."""

from __future__ import annotations

import logging

from rackscope.agent.settings import AgentSettings
from rackscope.agent.sources.base import GpuInfo, GpuSample, GpuSource
from rackscope.agent.sources.sim import SimSource
from rackscope.clock import Clock
from rackscope.simgpu import SimGpu, make_node_gpus

__all__ = ["GpuInfo", "GpuSample", "GpuSource", "SimSource", "open_source"]

log = logging.getLogger(__name__)

# A dcgm-exporter scrape ends before the next tick is due, so a stalled exporter costs one
# failed sample per interval rather than delaying the ticks after it.
DCGM_DEADLINE_FRACTION = 0.9


def dcgm_deadline_s(settings: AgentSettings) -> float:
    """The whole-scrape deadline the agent gives dcgm-exporter: ``--dcgm-timeout``, at most
    0.9 x ``--interval``."""
    return min(settings.dcgm_timeout_s, DCGM_DEADLINE_FRACTION * settings.interval_s)


def open_source(settings: AgentSettings, clock: Clock) -> tuple[GpuSource, list[GpuInfo], list[SimGpu] | None]:
    """Open the source the settings ask for. ``auto`` prefers NVML and falls back to the
    simulator with one log line saying why. Raises ``SourceUnavailable`` with a hint when an
    explicitly chosen source cannot run here."""
    choice = settings.source
    if choice == "auto":
        from rackscope.agent.sources import nvml

        reason = nvml.probe()
        if reason is None:
            choice = "nvml"
        else:
            log.info("source auto: NVML not usable (%s); using simulated GPUs (--source sim)", reason)
            choice = "sim"
    source: GpuSource
    sim_gpus: list[SimGpu] | None = None
    if choice == "nvml":
        from rackscope.agent.sources.nvml import NvmlSource

        source = NvmlSource()
    elif choice == "dcgm":
        from rackscope.agent.sources.dcgm import DcgmSource

        source = DcgmSource(settings.dcgm_url, timeout_s=dcgm_deadline_s(settings))
    else:
        sim_gpus = make_node_gpus(settings.gpu_model, settings.gpus, clock, settings.rack, settings.node, settings.seed)
        source = SimSource(sim_gpus)
    infos = source.open()
    log.info("source %s: %d GPU(s): %s", source.name, len(infos), ", ".join(sorted({i.model for i in infos})))
    return source, infos, sim_gpus
