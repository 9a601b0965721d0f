"""The scraper against a real HTTP server on 127.0.0.1 serving the recorded public pages, then
misbehaving: every broken, oversized, slow or silent answer leaves the snapshot failed or stale,
never holding a count."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from rackscope.engine_metrics import EngineFormat, EngineScraper, ScrapeStatus, metrics_url
from tests.helpers import wait_for
from tests.rackscope.engine_metrics.pages import SGLANG, TRTLLM_EMPTY, TRTLLM_STAT, VLLM_V0, VLLM_V1_EARLY, page
from tests.rackscope.engine_metrics.server import PageServer, elapsed, gzip_bomb

DEADLINE_S = 0.5
CAP = 64 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[PageServer]:
    s = PageServer(page(VLLM_V1_EARLY))
    yield s
    s.close()


def scraper(server: PageServer, **kwargs: object) -> EngineScraper:
    options: dict[str, object] = {"deadline_s": DEADLINE_S, "max_bytes": CAP, "interval_s": 1.0, **kwargs}
    return EngineScraper(server.url, **options)  # type: ignore[arg-type]


def test_metrics_url_of_a_server_is_its_origin_and_metrics() -> None:
    assert metrics_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/metrics"
    # Credentials, path and query belong to the API; the page is read without them.
    assert metrics_url("HTTPS://user:secret@[::1]:8443/proxy/v1?key=k") == "https://[::1]:8443/metrics"
    assert metrics_url("http://server.example") == "http://server.example/metrics"
    for bad in ("ftp://127.0.0.1/", "127.0.0.1:8000", "http://:80/", "http://h:99999/"):
        with pytest.raises(ValueError, match="not an http"):
            metrics_url(bad)


def test_each_reading_is_handed_over_with_the_moment_it_stands_for(server: PageServer) -> None:
    clock = Clock()
    seen: list[tuple[float, str]] = []

    def ticking() -> float:
        clock.now += 0.5  # each look at the clock moves it: before the request, after the answer
        return clock.now

    s = scraper(server, clock=ticking, on_reading=lambda t, r: seen.append((t, r.models[0].model)))
    s.scrape_once()
    assert seen == [(1000.75, "Qwen/Qwen2.5-Coder-32B-Instruct")]  # midway between 1000.5 and 1001.0
    server.mode, server.status = "status", 500
    s.scrape_once()
    assert len(seen) == 1  # a failed read hands nothing over
    assert s.last_error is not None and "answered 500" in s.last_error


def test_a_run_scraper_logs_its_first_failure_only(server: PageServer, caplog: pytest.LogCaptureFixture) -> None:
    server.mode, server.status = "status", 500
    quiet = scraper(server, log_failures="first")
    server.body = b"garbage"
    for mode in ("status", "page", "status"):  # two different failures, three times
        server.mode = mode
        quiet.scrape_once()
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    chatty = scraper(server)
    for mode in ("status", "page", "status"):
        server.mode = mode
        chatty.scrape_once()
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 3  # each new failure


def test_reads_a_real_page_and_holds_its_format(server: PageServer) -> None:
    s = scraper(server)
    assert s.snapshot().status is ScrapeStatus.PENDING
    snap = s.scrape_once()
    assert snap.status is ScrapeStatus.OK
    assert snap.format is EngineFormat.VLLM
    assert snap.reading is not None
    assert [(m.model, m.running, m.waiting, m.kv_cache_usage) for m in snap.reading.models] == [
        ("Qwen/Qwen2.5-Coder-32B-Instruct", 0.0, 0.0, 0.0)]
    # The server turning into another engine is an error, not a new truth.
    server.body = page(SGLANG)
    snap = s.scrape_once()
    assert snap.status is ScrapeStatus.FAILED and snap.reading is None
    assert "sglang metrics page, not the vllm page expected" in (snap.error or "")
    server.body = page(VLLM_V0)
    snap = s.scrape_once()
    assert snap.status is ScrapeStatus.OK
    assert snap.reading is not None and snap.reading.models[0].output_tokens == 218152.0
    assert (snap.scrapes, snap.failures) == (3, 1)


@pytest.mark.parametrize(
    ("mode", "error"),
    [("status", "answered 500"), ("trickle", "within"), ("flood", "more than"),
     ("bomb", "more than"), ("silent", "within")],
)
@pytest.mark.slow
def test_misbehaving_server_leaves_no_value(server: PageServer, mode: str, error: str) -> None:
    gzip_bomb()  # built before the clock starts
    s = scraper(server)
    assert s.scrape_once().status is ScrapeStatus.OK
    server.mode, server.status = mode, 500
    start = time.monotonic()
    snap = s.scrape_once()
    assert elapsed(start) < DEADLINE_S + 0.5  # the whole read is bounded, whatever the server does
    assert snap.status is ScrapeStatus.FAILED
    assert snap.reading is None  # the earlier good reading is not passed off as current
    assert error in (snap.error or "")


def test_garbage_page_is_a_failure(server: PageServer) -> None:
    server.body = b"<html>502 Bad Gateway</html>\n"
    snap = scraper(server).scrape_once()
    assert snap.status is ScrapeStatus.FAILED and snap.reading is None and snap.format is None


def test_unreachable_server_is_a_failure() -> None:
    s = EngineScraper("http://127.0.0.1:9/metrics", deadline_s=DEADLINE_S)
    snap = s.scrape_once()
    assert snap.status is ScrapeStatus.FAILED
    assert "http://127.0.0.1:9/metrics" in (snap.error or "")


def test_reading_goes_stale(server: PageServer) -> None:
    clock = Clock()
    s = scraper(server, clock=clock, stale_after_s=5.0)
    s.scrape_once()
    clock.now += 4.9
    assert s.snapshot().status is ScrapeStatus.OK
    clock.now += 0.2
    snap = s.snapshot()
    assert snap.status is ScrapeStatus.STALE and snap.reading is None
    assert snap.age_s == pytest.approx(5.1)


def test_trtllm_empty_answer_keeps_the_last_iteration_until_stale() -> None:
    clock = Clock()
    server = PageServer(page(TRTLLM_STAT), content_type="application/json")
    try:
        s = EngineScraper(server.url, model="llama2-70b", clock=clock, stale_after_s=3.0, deadline_s=DEADLINE_S)
        assert s.scrape_once().status is ScrapeStatus.OK
        server.body = page(TRTLLM_EMPTY)  # no iteration ran since the last read
        clock.now += 2.0
        snap = s.scrape_once()
        assert snap.status is ScrapeStatus.OK
        assert snap.reading is not None and snap.reading.models[0].running == 1.0
        clock.now += 1.5
        assert s.scrape_once().status is ScrapeStatus.STALE
        server.body = page(TRTLLM_STAT)
        assert s.scrape_once().status is ScrapeStatus.OK
    finally:
        server.close()


def test_thread_scrapes_and_stops_promptly_while_the_server_hangs(server: PageServer) -> None:
    s = scraper(server, interval_s=0.05, deadline_s=5.0)
    s.start()
    try:
        wait_for("a reading", lambda: s.snapshot().status is ScrapeStatus.OK)
        wait_for("a few reads", lambda: s.snapshot().scrapes >= 3)
        server.mode = "silent"
        seen = server.requests
        wait_for("a read left hanging", lambda: server.requests > seen)
    finally:
        start = time.monotonic()
        s.stop(timeout_s=2.0)
        assert elapsed(start) < 1.0  # stopping does not wait for the 5 s deadline
