"""The node agent at run time: samples its GPU source every interval, feeds telemetry, and
hosts the control API, the metrics endpoint and benchmark runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import uvicorn

from rackscope import __version__
from rackscope.agent.engine_metrics.host import EngineMetricsHost
from rackscope.agent.faults import Fault, apply_fault, clear_all
from rackscope.agent.logbuffer import process_log
from rackscope.agent.settings import AgentSettings
from rackscope.agent.sources.base import GpuInfo, GpuSample, GpuSource
from rackscope.agent.telemetry import Telemetry
from rackscope.clock import Clock, WallClock
from rackscope.errors import ConfigError
from rackscope.runner.energy import EnergyMeter, SimEnergyMeter
from rackscope.simgpu import SimGpu

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Identity:
    rack: str
    node: str
    source: str
    simulated: bool
    gpu_model: str
    gpus: int
    version: str = __version__


class NodeAgent:
    """One node's agent. Holds no global state, so several can share a process (the demo)."""

    def __init__(
        self,
        settings: AgentSettings,
        source: GpuSource,
        infos: list[GpuInfo],
        *,
        sim_gpus: list[SimGpu] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.infos = infos
        self.sim_gpus = sim_gpus
        self.clock = clock or WallClock()
        models = sorted({i.model for i in infos})
        self.identity = Identity(
            rack=settings.rack,
            node=settings.node,
            source=source.name,
            simulated=source.simulated,
            gpu_model=models[0] if len(models) == 1 else ",".join(models),
            gpus=len(infos),
        )
        self.telemetry = Telemetry(asdict(self.identity), settings)
        # The inference server's own view: the page the operator named, else a hosted run's server.
        self.engine_metrics = EngineMetricsHost(
            self.telemetry, url=settings.engine_metrics_url, fmt=settings.engine_metrics_format,
            interval_s=settings.interval_s,
        )
        self.latest: list[GpuSample] = []
        self.collection_errors = 0
        self.engine_slowdown = 1.0
        self.faults: list[Fault] = []
        self.started_at = time.time()
        self.api_port: int | None = None  # the bound port, once the API is up
        self.log = process_log()
        from rackscope.agent.runs import RunManager

        self.runs = RunManager(self)

    # --- sampling ------------------------------------------------------------------------
    def tick(self) -> None:
        """Take one sample of every GPU and hand it to telemetry. Never raises for a GPU."""
        start = time.perf_counter()
        try:
            samples = self.source.sample()
        except Exception as exc:  # thread/task boundary: a source bug must not stop the agent
            self.collection_errors += 1
            log.exception("sampling %s failed: %s", self.source.name, exc)
            samples = [GpuSample(index=i.index, timestamp_s=time.time(), ok=False, error=str(exc)) for i in self.infos]
        self.collection_errors += sum(1 for s in samples if not s.ok)
        self.latest = samples
        self.telemetry.update(self.infos, samples, time.perf_counter() - start, self.collection_errors)

    async def sample_forever(self, stop: asyncio.Event) -> None:
        """Sample on a fixed grid (no drift); blocking sources run in a worker thread."""
        interval = self.settings.interval_s
        blocking = getattr(self.source, "blocking", True)
        next_t = time.monotonic()
        while not stop.is_set():
            if blocking:
                await asyncio.to_thread(self.tick)
            else:
                self.tick()
            next_t += interval
            delay = next_t - time.monotonic()
            if delay < 0:  # fell behind (a slow source): skip missed ticks rather than burst
                next_t = time.monotonic()
                delay = 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    # --- faults --------------------------------------------------------------------------
    def require_sim(self, what: str) -> list[SimGpu]:
        if self.sim_gpus is None:
            raise ConfigError(f"{what} needs simulated GPUs (--source sim); this node uses {self.source.name}")
        return self.sim_gpus

    def inject(self, fault: Fault) -> None:
        gpus = self.require_sim("fault injection")
        if fault.name == "engine-slow":
            self.engine_slowdown = fault.value or 2.0
            self.runs.set_engine_slowdown(self.engine_slowdown)
        else:
            apply_fault(gpus, fault)
        self.faults = [f for f in self.faults if (f.name, f.gpu) != (fault.name, fault.gpu)] + [fault]
        log.warning("fault injected: %s on GPU %s", fault.name, "all" if fault.gpu is None else fault.gpu)

    def clear_faults(self) -> None:
        gpus = self.require_sim("fault injection")
        clear_all(gpus)
        self.engine_slowdown = 1.0
        self.runs.set_engine_slowdown(1.0)
        self.faults = []

    def fault_state(self) -> dict[str, object]:
        return {
            "active": [asdict(f) for f in self.faults],
            "engine_slowdown": self.engine_slowdown,
            "gpus": [{"gpu": g.index, **g.faults.as_dict()} for g in (self.sim_gpus or [])],
        }

    # --- views ---------------------------------------------------------------------------
    def node_view(self) -> dict[str, object]:
        latest = {s.index: s for s in self.latest}
        gpus = []
        for info in self.infos:
            sample = latest.get(info.index)
            gpus.append({**asdict(info), "sample": asdict(sample) if sample else None})
        return {
            **asdict(self.identity),
            "interval_s": self.settings.interval_s,
            "started_at": self.started_at,
            "collection_errors": self.collection_errors,
            "metrics_port": self.telemetry.metrics_port,
            "gpus": gpus,
        }

    def energy_meter(self) -> EnergyMeter:
        """The runner's energy meter: exact for simulated GPUs, the latest samples otherwise."""
        if self.sim_gpus is not None:
            return SimEnergyMeter(self.sim_gpus, self.identity.node)
        return _SampleEnergyMeter(self)

    # --- serving -------------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set: sampler, metrics endpoint, control API, workload."""
        from rackscope.agent.api import create_app

        self.telemetry.start()
        self.engine_metrics.start()
        self.tick()
        tasks: list[asyncio.Task[None]] = []
        api_server: uvicorn.Server | None = None
        try:
            if self.settings.metrics_enabled:
                await self.telemetry.serve()
            tasks.append(asyncio.create_task(self.sample_forever(stop), name="sampler"))
            if self.settings.api_enabled:
                api_server = _QuietServer(
                    uvicorn.Config(
                        create_app(self),
                        host=self.settings.api_host,
                        port=self.settings.api_port,
                        log_level="warning",
                        access_log=False,
                        lifespan="off",
                    )
                )
                tasks.append(asyncio.create_task(api_server.serve(), name="api"))
                while not api_server.started:
                    if tasks[-1].done():
                        tasks[-1].result()  # raises the bind error
                        raise OSError(
                            f"control API failed to start on {self.settings.api_host}:{self.settings.api_port}"
                        )
                    await asyncio.sleep(0.01)
                self.api_port = api_server.servers[0].sockets[0].getsockname()[1]
            log.info(
                "agent %s/%s up: source=%s gpus=%d metrics=%s api=%s",
                self.identity.rack,
                self.identity.node,
                self.identity.source,
                self.identity.gpus,
                self.telemetry.metrics_port or "off",
                self.api_port or "off",
            )
            if ready is not None:
                ready.set()
            await stop.wait()
        finally:
            self.source.interrupt()  # a sample waiting on a peer (dcgm-exporter) ends now, not at its deadline
            await self.runs.shutdown()
            if api_server is not None:
                api_server.should_exit = True
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    if task.get_name() == "sampler":
                        task.cancel()
                    await task
            self.tick()  # the last sample goes out with the final export
            await asyncio.to_thread(self.engine_metrics.stop)
            await self.telemetry.close()
            await asyncio.to_thread(self.telemetry.shutdown, SHUTDOWN_FLUSH_TIMEOUT_S)
            self.source.close()


class _SampleEnergyMeter:
    """Cumulative joules per GPU ("node/index") from the agent's latest samples."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def read(self) -> dict[str, float]:
        node = self.agent.identity.node
        return {f"{node}/{s.index}": s.energy_j for s in self.agent.latest if s.ok and s.energy_j is not None}


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the agent owns SIGINT/SIGTERM and shuts
    everything down in order (flushing the last export)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
