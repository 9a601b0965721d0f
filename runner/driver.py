"""One ``rackscope run`` in this process: dataset, engine, metrics export, signals, scenario, record.

The engine comes from the engine registry; the record and exit status from ``runner.finish``;
the server's own view of the run (an ``openai`` run's server metrics page) from
``runner.server_view``."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rackscope.errors import ConfigError
from rackscope.runner.datasets import DEFAULT_DATASET_MAX_BYTES
from rackscope.runner.engines.registry import EngineOptions, build_engine
from rackscope.runner.finish import check_output, finish_run
from rackscope.runner.signals import Signals

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

    from rackscope.runner.config import RunConfig
    from rackscope.runner.datasets import Dataset
    from rackscope.runner.results.record import RunResult

# OTLP export interval of a run's workload metrics.
OTLP_EXPORT_INTERVAL_MS = 5000


@dataclass(frozen=True)
class RunOptions:
    """What ``rackscope run`` takes besides the run settings: where the record goes, how the
    workload metrics leave, the engine's own flags."""

    output: Path | None = None  # the record (per-request rows beside it)
    dataset_max_bytes: int = DEFAULT_DATASET_MAX_BYTES  # largest --dataset file read
    otlp_endpoint: str | None = None
    metrics_port: int | None = None  # serve /metrics on 127.0.0.1:PORT while the run lasts
    workdir: Path | None = None  # where a whole-benchmark tool writes its files
    engine: EngineOptions = field(default_factory=EngineOptions)


def load_run_dataset(config: RunConfig, options: RunOptions) -> Dataset:
    """The run's dataset: a ``--dataset`` file (a regular file within ``--dataset-max-mib``)
    or synthetic prompts."""
    from rackscope.runner.datasets import load_dataset
    from rackscope.runner.scenarios import make_dataset

    if config.dataset:
        return load_dataset(config.dataset, config.dataset_format, max_bytes=options.dataset_max_bytes)
    return make_dataset(config)


def meter_provider(options: RunOptions) -> MeterProvider | None:
    """An SDK meter provider, only when metrics export was asked for (the agent is the usual host)."""
    if options.otlp_endpoint is None and options.metrics_port is None:
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    readers: list[MetricReader] = []
    if options.otlp_endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        endpoint = options.otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/metrics"):
            endpoint += "/v1/metrics"
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint), OTLP_EXPORT_INTERVAL_MS))
    if options.metrics_port is not None:
        try:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server
        except ImportError as exc:
            raise ConfigError(
                "--metrics-port needs opentelemetry-exporter-prometheus (pip install rackscope[dev]); "
                "or run under the agent, which serves /metrics itself"
            ) from exc
        start_http_server(options.metrics_port, addr="127.0.0.1")
        readers.append(PrometheusMetricReader())
    return MeterProvider(metric_readers=readers, resource=Resource.create({"service.name": "rackscope-run"}))


# Awaited once the engine is ready, just before the workload starts (see ``drive``).
Ready = Callable[[], Awaitable[None]]


async def drive(config: RunConfig, options: RunOptions, *, ready: Ready | None = None) -> int:
    """Run a streaming engine through the scenario; returns the exit status. ``ready``, when
    given, is awaited after the engine has started and before the workload begins: a rack task
    waits at its start barrier there, so a slow engine start does not spread the nodes' starts.
    What it raises ends the run before it began (the engine is stopped, no record is written)."""
    from rackscope.runner.progress import terminal_progress
    from rackscope.runner.runloop import run_scenario
    from rackscope.runner.server_view import end_watch, watch_run

    if config.workers > 1:
        return await _drive_workers(config, options, ready)
    dataset = load_run_dataset(config, options)  # a bad dataset file fails before anything starts
    if options.output is not None:
        check_output(options.output)
    built = build_engine(config, options.engine)
    engine = built.engine
    await engine.start()  # EngineUnavailable: reported by the CLI, no record written
    provider = meter_provider(options)
    if engine.model and engine.model != config.model:
        config = dataclasses.replace(config, model=engine.model)
    watch = await watch_run(config, engine)
    progress = terminal_progress(sys.stderr)
    cancel = asyncio.Event()
    result: RunResult | None = None
    try:
        if ready is not None:
            await ready()
        with Signals(cancel) as signals:
            result = await run_scenario(
                engine, config, clock=built.clock, energy=built.energy,
                meter=provider.get_meter("rackscope.runner") if provider is not None else None,
                progress=progress, cancel=cancel, dataset=dataset,
            )
    finally:
        if progress is not None:
            progress.close()
        if watch is not None:
            await end_watch(watch, config, result)
        await engine.stop()
        if provider is not None:
            provider.shutdown()
    assert result is not None  # run_scenario returned (a stopped run returns a partial result)
    return await finish_run(result, options.output, signals.received)


async def _drive_workers(config: RunConfig, options: RunOptions, ready: Ready | None = None) -> int:
    """The engine over several client processes (``runner.multiprocess``)."""
    from rackscope.runner.multiprocess import run_with_workers
    from rackscope.runner.progress import terminal_progress
    from rackscope.runner.server_view import end_watch, watch_run

    dataset = load_run_dataset(config, options)
    if options.output is not None:
        check_output(options.output)
    built = build_engine(config, options.engine)  # check the server here first: one clear error, no workers
    await built.engine.start()
    if built.engine.model and built.engine.model != config.model:
        config = dataclasses.replace(config, model=built.engine.model)
    await built.engine.stop()
    provider = meter_provider(options)
    # The workers' arrival times are on the same monotonic clock as this process's engine.
    watch = await watch_run(config, built.engine)
    stop = threading.Event()
    cancel = asyncio.Event()
    progress = terminal_progress(sys.stderr)
    result: RunResult | None = None
    try:
        if ready is not None:
            await ready()
        with Signals(cancel, also=stop) as signals:
            result = await asyncio.to_thread(
                run_with_workers, config, stop=stop, dataset=dataset,
                meter=provider.get_meter("rackscope.runner") if provider is not None else None,
                progress=progress,
            )
    finally:
        if progress is not None:
            progress.close()
        if watch is not None:
            await end_watch(watch, config, result)
        if provider is not None:
            provider.shutdown()
    assert result is not None  # run_with_workers returned
    return await finish_run(result, options.output, signals.received)
