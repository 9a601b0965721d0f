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

        source = DcgmSource(settings.dcgm_url)
    else:
        sim_gpus = make_node_gpus(settings.gpu_model, settings.gpus, clock, settings.rack, settings.node, settings.seed)
        source = SimSource(sim_gpus)
    infos = source.open()
    log.info("source %s: %d GPU(s): %s", source.name, len(infos), ", ".join(sorted({i.model for i in infos})))
    return source, infos, sim_gpus
