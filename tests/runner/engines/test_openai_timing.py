"""The openai engine's timestamps against a server process that sends on a fixed schedule.

The server (``benchmarks/_server.py``, its own process on 127.0.0.1) sends the first token
80 ms after a request reaches it and then one every 8 ms, so 64 streams that start together
also finish and restart together: the client has a burst of responses to read, records to
finish and requests to send at the same moments. The client's TTFT and token gaps must still
follow the schedule. Only medians are asserted, with room for a loaded machine: a slow
moment moves the tail, which benchmarks/loadgen.py's lockstep section reports.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rackscope.runner.engines.base import Request
from rackscope.runner.engines.openai import OpenAIEngine
from rackscope.runner.records import RequestRecord
from rackscope.runner.workers import run_client

pytestmark = pytest.mark.slow  # a server process and a few seconds of streaming

SERVER = Path(__file__).resolve().parents[3] / "benchmarks" / "_server.py"
MODEL = "bench-model"
TTFT_S = 0.080
ITL_S = 0.008
STREAMS = 64
TOKENS = 24
WAVES = 3
P50_BOUND_MS = 3.0  # a median offset; a timestamp taken where work was queued misses by more


@pytest.fixture(scope="module")
def schedule_server() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--model", MODEL, "--ttft-ms", str(TTFT_S * 1e3), "--itl-ms", str(ITL_S * 1e3)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def server_report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Stop the server: how late its own sends were against the schedule, and per request id
    when the request arrived and when each token left."""
    out, _ = proc.communicate(timeout=30)
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


async def lockstep(base_url: str) -> list[RequestRecord]:
    engine = OpenAIEngine(base_url, MODEL)
    await engine.start()
    await engine.prewarm(STREAMS)
    records: list[RequestRecord] = []

    async def stream(k: int) -> None:
        for wave in range(WAVES):
            rid = f"lock-{wave}-{k}"
            records.append(await engine.record(Request(rid, prompt="timing", max_output_tokens=TOKENS)))

    try:
        await asyncio.gather(*(stream(k) for k in range(STREAMS)))
    finally:
        await engine.stop()
    return records


def test_lockstep_streams_keep_the_schedule(schedule_server: tuple[str, subprocess.Popen[str]]) -> None:
    base_url, proc = schedule_server
    records = run_client(lockstep(base_url))
    report = server_report(proc)
    log: dict[str, tuple[float, list[float]]] = report.pop("log")

    assert len(records) == STREAMS * WAVES
    assert all(r.ok for r in records), [r.error for r in records if not r.ok][:3]
    assert {r.output_tokens for r in records} == {TOKENS}
    # Against the schedule, and against what the server really did (on a loaded machine the
    # server's own sends slip too; that is not the client's error).
    ttft_ms, gaps_ms, ttft_err_ms, gap_err_ms = [], [], [], []
    for r in records:
        recv_s, sends = log[r.request_id]
        assert len(sends) == TOKENS
        assert r.ttft_s is not None
        assert r.itl_s is not None
        ttft_ms.append((r.ttft_s - TTFT_S) * 1e3)
        ttft_err_ms.append((r.ttft_s - (sends[0] - recv_s)) * 1e3)
        for k, gap in enumerate(r.itl_s, start=1):
            gaps_ms.append((gap - ITL_S) * 1e3)
            gap_err_ms.append((gap - (sends[k] - sends[k - 1])) * 1e3)
    assert len(gaps_ms) == STREAMS * WAVES * (TOKENS - 1)
    # The first token cannot be seen before the server sends it.
    assert min(ttft_ms) > -0.5, f"TTFT earlier than the schedule: {min(ttft_ms):.3f} ms"
    context = f"server's own lateness against the schedule: {report}"
    for what, values in (("TTFT", ttft_err_ms), ("ITL", gap_err_ms)):
        p50 = statistics.median(values)
        assert abs(p50) < P50_BOUND_MS, f"{what} p50 error against the server's sends {p50:+.3f} ms; {context}"
    server_late_ms = float(report["late_p50_ms"])
    for what, values in (("TTFT", ttft_ms), ("ITL", gaps_ms)):
        p50 = statistics.median(values)
        assert abs(p50) < P50_BOUND_MS + server_late_ms, f"{what} p50 offset {p50:+.3f} ms; {context}"
    # Every request of a wave goes out together and the server answers each on its own
    # schedule, so the starts the client recorded span no more than the burst it sent.
    first_wave = sorted(r.start_s for r in records if r.request_id.startswith("lock-0-"))
    assert first_wave[-1] - first_wave[0] < 0.5
