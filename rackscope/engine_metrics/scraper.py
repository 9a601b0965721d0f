"""The bounded periodic scraper of an inference server's metrics page and its typed snapshot.

One daemon thread reads the page every interval through ``rackscope.peers.fetch`` (a
whole-read deadline, a cap on the decoded size, and the scraper's stop flag, so shutdown
never waits on the server) and publishes an immutable ``EngineSnapshot``. The snapshot only
carries values while they are fresh:

- ``ok``: the last read succeeded within ``stale_after_s``; its reading is current.
- ``failed``: the last read failed (unreachable, too slow, too large, not understood); no
  values, whatever an earlier read said.
- ``stale``: no successful read for ``stale_after_s`` (the thread is wedged, or a
  ``trtllm-serve`` that ran no iteration keeps answering ``[]``); no values.
- ``pending``: nothing read yet.

The format is detected from the first page understood (unless given) and then held: a page
of another format later is an error, not a new truth.

``on_reading`` hands each page understood, with the moment it stands for, to a caller that
keeps a history (a run's view of its server, ``rackscope.engine_metrics.history``): the
midpoint between sending the request and the end of the answer, on the scraper's clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal
from urllib.parse import urlsplit

from rackscope.engine_metrics.formats import EngineFormat, Reading, read_page
from rackscope.errors import PeerError
from rackscope.peers import MIB, Target, fetch
from rackscope.urls import redact_url

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0
DEFAULT_DEADLINE_S = 2.0  # a whole read; a vLLM page under load renders in milliseconds
DEFAULT_MAX_BYTES = 8 * MIB  # decoded; a vLLM page with every histogram is a few hundred KiB
STALE_INTERVALS = 5  # intervals without a fresh reading after which the last one is withheld
METRICS_PATH = "/metrics"
_HEADERS = {
    # The servers' Prometheus clients negotiate: ask for the classic text format.
    "Accept": "text/plain;version=0.0.4;q=1.0, application/json;q=0.5, */*;q=0.1",
    "User-Agent": "rackscope-agent",
}


class ScrapeStatus(StrEnum):
    PENDING = "pending"
    OK = "ok"
    STALE = "stale"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """What the exporters may say about the inference server now. ``reading`` is set only
    when ``status`` is ok."""

    status: ScrapeStatus
    format: EngineFormat | None
    reading: Reading | None
    age_s: float | None  # since the last page understood; None before the first
    error: str | None  # why the last read failed, or why the reading is stale
    scrapes: int  # reads attempted
    failures: int  # reads that failed


def metrics_url(server_url: str) -> str:
    """The metrics page of an OpenAI-compatible server given by its URL: the server's origin
    (scheme, host and port) + ``/metrics``. Credentials, path and query of ``server_url`` are
    left out: they belong to the API, and the page is read without them (vLLM, SGLang and
    ``trtllm-serve`` serve it unauthenticated at the root). ``ValueError`` for what is not an
    http(s) URL with a host."""
    parts = urlsplit(server_url)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not an http:// or https:// URL: {redact_url(server_url)!r}") from exc
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http:// or https:// URL: {redact_url(server_url)!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme.lower()}://{netloc}{METRICS_PATH}"


class EngineScraper:
    """Reads one inference server's metrics page every ``interval_s`` on its own thread.

    ``scrape_once`` does one read on the caller's thread (tests, and the thread's loop);
    ``snapshot`` is cheap and safe from any thread."""

    def __init__(
        self,
        url: str,
        *,
        fmt: EngineFormat | None = None,
        model: str | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        deadline_s: float = DEFAULT_DEADLINE_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        stale_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_reading: Callable[[float, Reading], None] | None = None,
        log_failures: Literal["distinct", "first"] = "distinct",
    ) -> None:
        """``log_failures``: ``distinct`` logs each new failure (a long-lived agent, whose
        operator wants to see the server come and go); ``first`` logs the first one only (a run,
        which records what became of the page instead)."""
        self.target = Target.parse(url, METRICS_PATH)  # ValueError for what is not http(s)
        self.url = redact_url(url)
        if not interval_s > 0 or not deadline_s > 0 or max_bytes < 1:
            raise ValueError("interval, deadline and size cap must be positive")
        self.model = model
        self.interval_s = interval_s
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes
        self.stale_after_s = stale_after_s if stale_after_s is not None else STALE_INTERVALS * interval_s + deadline_s
        self._clock = clock
        self._format = fmt
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reading: Reading | None = None
        self._read_at: float | None = None  # clock time of the last page understood
        self._error: str | None = None  # set while the last read failed
        self._scrapes = 0
        self._failures = 0
        self._logged_error: str | None = None
        self._on_reading = on_reading
        self._log_failures = log_failures
        self.last_error: str | None = None  # the last failure, kept after recovery (for a record)

    @property
    def format(self) -> EngineFormat | None:
        """The format given, or detected from the first page understood."""
        return self._format

    # --- one read --------------------------------------------------------------------------
    def scrape_once(self) -> EngineSnapshot:
        """Read the page once and publish what it said (or why it said nothing)."""
        sent = self._clock()
        try:
            response = fetch(
                self.target, deadline_s=self.deadline_s, max_bytes=self.max_bytes, headers=_HEADERS, stop=self._stop
            )
            received = self._clock()  # the page was rendered in between; parsing it takes no part
            if response.status != 200:
                raise PeerError(f"{self.target.what} answered {response.status} {response.reason}")
            reading = read_page(
                response.body,
                content_type=response.headers.get("content-type"),
                fmt=self._format,
                model=self.model,
                what=self.target.what,
            )
        except PeerError as exc:
            if self._stop.is_set():
                return self.snapshot()  # abandoned because we stopped: the page's doing was not seen
            self._fail(str(exc))
        else:
            self._succeed(reading)
            if self._on_reading is not None:
                self._on_reading((sent + received) / 2, reading)
        return self.snapshot()

    def _succeed(self, reading: Reading) -> None:
        with self._lock:
            self._scrapes += 1
            self._error = None
            if self._format is None:
                self._format = reading.format
                log.info("engine metrics at %s read as %s", self.url, reading.format)
            if reading.models or self._reading is None or reading.format is not EngineFormat.TRTLLM:
                self._reading = reading
                self._read_at = self._clock()
            # else: trtllm-serve's "[]" says no iteration ran since the last read, so the last
            # reading stands until it goes stale.
        if self._logged_error is not None:
            log.info("engine metrics at %s readable again", self.url)
            self._logged_error = None

    def _fail(self, error: str) -> None:
        with self._lock:
            self._scrapes += 1
            self._failures += 1
            self._error = error
            self.last_error = error
            first = self._failures == 1
        if self._log_failures == "first":
            if first:
                log.warning("engine metrics unreadable: %s", error)
        elif error != self._logged_error:  # once per distinct failure, not once per second
            log.warning("engine metrics unreadable: %s", error)
            self._logged_error = error

    # --- what the exporters read -----------------------------------------------------------
    def snapshot(self) -> EngineSnapshot:
        with self._lock:
            age = None if self._read_at is None else self._clock() - self._read_at
            base = EngineSnapshot(
                ScrapeStatus.PENDING, self._format, None, age, self._error, self._scrapes, self._failures
            )
            if self._error is not None:
                return replace(base, status=ScrapeStatus.FAILED)
            if self._reading is None or age is None:
                return base
            if age > self.stale_after_s:
                return replace(base, status=ScrapeStatus.STALE, error=f"no fresh reading for {age:.1f} s")
            return replace(base, status=ScrapeStatus.OK, reading=self._reading)

    # --- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine scraper is already running")
        self._thread = threading.Thread(target=self._loop, name="engine-metrics", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stops the thread; a read in progress is abandoned within ``peers.READ_SLICE_S``."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.scrape_once()
            except Exception:  # thread boundary: a parser bug must not end the scraping
                log.exception("reading engine metrics at %s failed unexpectedly", self.url)
                self._fail("internal error while reading the page (see the agent log)")
            next_at += self.interval_s
            delay = next_at - time.monotonic()
            if delay < 0:  # a slow server: skip the missed reads rather than burst
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)


__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_INTERVAL_S",
    "DEFAULT_MAX_BYTES",
    "EngineScraper",
    "EngineSnapshot",
    "ScrapeStatus",
    "metrics_url",
]
