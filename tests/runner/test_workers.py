"""Worker processes: sharing the load, merging records on one clock, stopping on SIGINT."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest

from rackscope.errors import EngineUnavailable
from rackscope.runner.engines.base import EngineEvent, Request
from rackscope.runner.engines.openai import OpenAIEngine
from rackscope.runner.workers import collect, run_workers
from tests.helpers import start_limited, stop_process, wait_for

SERVER_PATH = Path(__file__).resolve().parent / "streaming_server.py"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_server_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("streaming_server", SERVER_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("streaming_server", module)
    spec.loader.exec_module(module)
    return module


srv = _load_server_module()


@pytest.fixture(scope="module")
def server() -> Iterator[srv.StreamingServer]:
    with srv.StreamingServer() as s:
        yield s


def requests(n: int, tokens: int = 8, **x_test: object) -> list[Request]:
    return [
        Request(request_id=f"q{i}", prompt="hi", max_output_tokens=tokens, extra={"x_test": x_test}) for i in range(n)
    ]


@pytest.mark.slow
def test_two_workers_merge_records_in_request_order(server: srv.StreamingServer) -> None:
    reqs = requests(40, tokens=8, itl_s=0.002)
    before = time.perf_counter()
    run = run_workers(reqs, partial(OpenAIEngine, server.base_url, "test-model"), workers=2, concurrency=8)
    after = time.perf_counter()
    assert not run.interrupted
    assert [r.request_id for r in run.records] == [f"q{i}" for i in range(40)]
    assert all(r.ok and r.output_tokens == 8 and r.output_tokens_method == "usage" for r in run.records)
    # One clock for all processes: every record sits inside the parent's view of the run.
    assert before < run.start_s <= min(r.start_s for r in run.records)
    assert max(r.end_s or 0 for r in run.records) <= run.end_s <= after
    assert len(run.cpu_s) == 2
    assert all(c > 0 for c in run.cpu_s)
    # Requests alternate between the workers; both ran their share at once.
    assert len({r.request_id for r in run.records}) == 40


@pytest.mark.slow
def test_closed_loop_keeps_the_concurrency(server: srv.StreamingServer) -> None:
    reqs = requests(24, tokens=4, ttft_s=0.05)
    run = run_workers(reqs, partial(OpenAIEngine, server.base_url, "test-model"), workers=2, concurrency=6)
    starts = sorted(r.start_s - run.start_s for r in run.records)
    # 6 in flight, each about 50 ms long: four waves of six.
    assert starts[5] < 0.045 < starts[6]
    assert 0.15 < run.end_s - run.start_s < 2.0


@pytest.mark.slow
def test_arrival_schedule_is_kept(server: srv.StreamingServer) -> None:
    reqs = requests(10, tokens=2)
    arrivals = [0.05 * i for i in range(10)]
    run = run_workers(reqs, partial(OpenAIEngine, server.base_url, "test-model"), workers=2, arrivals_s=arrivals)
    offsets = [r.start_s - run.start_s for r in run.records]
    assert all(r.ok for r in run.records)
    for want, got in zip(arrivals, offsets, strict=True):
        assert want - 0.002 <= got < want + 0.1


@pytest.mark.slow
def test_offline_sends_everything_at_once(server: srv.StreamingServer) -> None:
    reqs = requests(30, tokens=3, ttft_s=0.1)
    run = run_workers(reqs, partial(OpenAIEngine, server.base_url, "test-model"), workers=3)
    assert all(r.ok for r in run.records)
    assert max(r.start_s for r in run.records) - run.start_s < 0.09  # each request lasts 0.1 s


def test_engine_that_cannot_start_raises(server: srv.StreamingServer) -> None:
    with pytest.raises(EngineUnavailable, match="not served"):
        run_workers(requests(4), partial(OpenAIEngine, server.base_url, "no-such-model"), workers=2)


def test_bad_arguments() -> None:
    factory = partial(OpenAIEngine, "http://127.0.0.1:1", "m")
    with pytest.raises(ValueError, match="workers"):
        run_workers(requests(2), factory, workers=0)
    with pytest.raises(ValueError, match="arrivals"):
        run_workers(requests(2), factory, workers=1, arrivals_s=[0.0])
    assert run_workers([], factory, workers=2).records == []


class StreamOnly:
    """An engine offering only ``stream()``, by delegation: the generic path of ``collect``."""

    name = "stream-only"

    def __init__(self, inner: OpenAIEngine) -> None:
        self.inner = inner
        self.model = inner.model

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    def stream(self, request: Request) -> AsyncIterator[EngineEvent]:
        return self.inner.stream(request)

    def now(self) -> float:
        return self.inner.now()


async def test_collect_takes_the_same_figures_from_stream_and_record(server: srv.StreamingServer) -> None:
    inner = OpenAIEngine(server.base_url, "test-model")
    generic = StreamOnly(inner)
    await generic.start()
    via_stream = await collect(generic, requests(1, tokens=6, itl_s=0.01)[0])
    via_record = await collect(inner, requests(1, tokens=6, itl_s=0.01)[0])
    for rec in (via_stream, via_record):
        assert rec.ok
        assert rec.output_tokens == 6
        assert rec.output_tokens_method == "usage"
        assert rec.itl_s is not None
        assert len(rec.itl_s) == 5
        # Five 10 ms gaps; a loaded machine may bunch two, so judge the total and the median.
        assert 0.03 < sum(rec.itl_s) < 0.5
        assert sorted(rec.itl_s)[2] > 0.005
    failed = await collect(generic, requests(1, tokens=6, status=503)[0])
    assert not failed.ok
    assert failed.error_type == "http_5xx"
    await generic.stop()


DRIVER = """
import importlib.util, json, sys, threading, time
from functools import partial
spec = importlib.util.spec_from_file_location("streaming_server", sys.argv[1])
srv = importlib.util.module_from_spec(spec); sys.modules["streaming_server"] = srv; spec.loader.exec_module(srv)
from rackscope.runner.engines.base import Request
from rackscope.runner.engines.openai import OpenAIEngine
from rackscope.runner.workers import run_workers

if __name__ == "__main__":
    with srv.StreamingServer() as s:
        reqs = [Request(f"q{i}", prompt="hi", max_output_tokens=400 if i >= 4 else 2, extra={"x_test": {"itl_s": 0.01}})
                for i in range(40)]
        def announce():
            while sum(r.method == "POST" for r in s.requests) < 12:
                time.sleep(0.01)
            print("in flight", flush=True)

        threading.Thread(target=announce, daemon=True).start()
        run = run_workers(reqs, partial(OpenAIEngine, s.base_url, "test-model"), workers=2, concurrency=8)
        print(json.dumps({
            "interrupted": run.interrupted,
            "ok": sum(r.ok for r in run.records),
            "cancelled": sum(r.error_type == "cancelled" for r in run.records),
            "records": len(run.records),
        }), flush=True)
"""


@pytest.mark.slow
def test_sigint_stops_the_workers_and_returns_what_completed(tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # The server module imports ``tests.helpers``: the driver, run from tmp_path, finds it on PYTHONPATH.
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, str(driver), str(SERVER_PATH)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    assert proc.stdout is not None
    # Twelve requests sent with eight slots means the four short ones finished (only they can
    # free a slot this soon) and eight long ones (4 s each) are in flight: then Ctrl-C.
    assert proc.stdout.readline().strip() == "in flight"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["interrupted"] is True
    assert result["ok"] >= 4  # the short requests finished
    assert result["cancelled"] == 8  # the long ones in flight were cut
    assert result["records"] == result["ok"] + result["cancelled"] < 40


RACE_DRIVER = """
import asyncio, os, sys, time
from functools import partial
from pathlib import Path
from rackscope.errors import EngineUnavailable
from rackscope.runner.engines.base import Request
from rackscope.runner.workers import run_workers


class GatedEngine:
    '''Fails to start, as an engine asked for a model its server lacks, once the gate opens.'''

    name = "gated"
    model = "no-such-model"

    def __init__(self, gate, marks):
        self.gate, self.marks = Path(gate), Path(marks)

    async def start(self):
        (self.marks / f"waiting.{os.getpid()}").touch()
        while not self.gate.exists():
            await asyncio.sleep(0.01)
        raise EngineUnavailable("model 'no-such-model' is not served here")

    async def stop(self):
        pass

    def stream(self, request):
        raise NotImplementedError

    def now(self):
        return time.perf_counter()


if __name__ == "__main__":
    reqs = [Request(f"q{i}", prompt="hi", max_output_tokens=2) for i in range(4)]
    try:
        run_workers(reqs, partial(GatedEngine, sys.argv[1], sys.argv[2]), workers=2)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)
"""


def _zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.slow
def test_engine_error_wins_over_a_worker_that_already_exited(tmp_path: Path) -> None:
    """Both workers fail to start and exit before the parent reads either: the parent reads
    worker 0's error first and tells worker 1, already gone, to abort. The user must get the
    engine's error, not a BrokenPipeError from that abort."""
    driver = tmp_path / "driver.py"
    driver.write_text(RACE_DRIVER)
    gate, marks = tmp_path / "gate", tmp_path / "marks"
    marks.mkdir()
    proc = start_limited([sys.executable, str(driver), str(gate), str(marks)])
    try:
        pids = wait_for("both workers starting", lambda: [int(p.suffix[1:]) for p in marks.iterdir()] if len(
            list(marks.iterdir())) == 2 else None, timeout_s=60)
        # The parent is held still while both workers fail and exit, so that it finds both
        # pipes readable at once, and the worker it answers first is not the one it aborts.
        os.kill(proc.pid, signal.SIGSTOP)
        gate.touch()
        wait_for("both workers exited", lambda: all(_zombie(pid) for pid in pids), timeout_s=30)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        stop_process(proc)
    assert proc.returncode == 0, err
    assert out.strip().startswith("EngineUnavailable: worker "), (out, err)
    assert "could not start its engine" in out and "is not served here" in out
    assert "BrokenPipeError" not in err
