"""The agent's view of its inference server: instruments registered once, and the scraper
behind them, set by the operator or, failing that, followed for each run against a server.

With ``--engine-metrics URL`` the agent reads that page for its whole life. Without it, a run
the agent hosts against an OpenAI-compatible server (``engine: openai``) has the server's own
page (its URL + ``/metrics``, format detected) read for the length of the run; between runs
nothing is exported.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from rackscope.agent.engine_metrics.instruments import ENGINE_SCOPE, EngineHistograms, EngineInstruments
from rackscope.agent.telemetry import Telemetry
from rackscope.engine_metrics.formats import EngineFormat
from rackscope.engine_metrics.scraper import EngineScraper, EngineSnapshot, metrics_url

log = logging.getLogger(__name__)


class EngineMetricsHost:
    """One per agent. ``start``/``stop`` with the agent; ``follow`` around a run."""

    def __init__(
        self, telemetry: Telemetry, *, url: str | None = None, fmt: str | None = None, interval_s: float = 1.0
    ) -> None:
        self.interval_s = interval_s
        self._configured = EngineScraper(url, fmt=EngineFormat(fmt) if fmt else None, interval_s=interval_s) \
            if url else None
        self._configured_url = url if self._configured is not None else None  # as given, to read again
        self._current: EngineScraper | None = None
        self._lock = threading.Lock()
        identity = telemetry.identity
        self._telemetry = telemetry
        self._instruments: EngineInstruments | None = None
        self._rack, self._node = identity.rack, identity.node

    @property
    def configured_url(self) -> str | None:
        """The page the operator named (``--engine-metrics``), if any."""
        return self._configured_url

    @property
    def configured(self) -> bool:
        """True when the operator named the page (``--engine-metrics``)."""
        return self._configured is not None

    def snapshot(self) -> EngineSnapshot | None:
        current = self._current
        return current.snapshot() if current is not None else None

    def start(self) -> None:
        """Registers the instruments (the telemetry must be started) and starts the configured
        scraper, if any."""
        if self._instruments is None:
            meter = self._telemetry.meter_provider.get_meter(ENGINE_SCOPE, self._telemetry.identity.version)
            self._instruments = EngineInstruments(meter, self.snapshot, self._rack, self._node)
            self._telemetry.histograms.add_source(EngineHistograms(self.snapshot, self._rack, self._node))
        if self._configured is not None and self._current is None:
            self._current = self._configured
            self._configured.start()
            log.info("reading engine metrics at %s", self._configured.url)

    @contextlib.contextmanager
    def follow(self, server_url: str | None, model: str | None = None) -> Iterator[None]:
        """Reads ``server_url``'s metrics page while the block runs, unless the operator named
        one (then that one is kept) or another run is followed already."""
        scraper = None
        if server_url and self._configured is None:
            with self._lock:
                if self._current is None:
                    try:
                        scraper = EngineScraper(metrics_url(server_url), model=model, interval_s=self.interval_s)
                    except ValueError as exc:
                        log.warning("not reading the server's metrics: %s", exc)
                    else:
                        self._current = scraper
        if scraper is not None:
            scraper.start()
        try:
            yield
        finally:
            if scraper is not None:
                with self._lock:
                    self._current = None
                scraper.stop(timeout_s=0.5)  # the thread ends on its own; do not hold up the run

    def stop(self) -> None:
        with self._lock:
            current, self._current = self._current, None
        if current is not None:
            current.stop()


__all__ = ["EngineMetricsHost"]
