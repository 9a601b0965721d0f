"""Benchmark: client CPU per streamed token and timestamp accuracy of the ``openai`` engine.

Starts its own streaming server (``_server.py``) in a separate process whose timing is
controlled to microseconds, and in one run measures, at concurrency 1, 64 and 256:

- client CPU per streamed token (the client process's CPU time / tokens) and achieved
  tokens/s, for rackscope (``run_workers`` with one worker: the real code path) and for a
  plain aiohttp + orjson client (the baseline, printed as a ratio);
- the error of the client's TTFT and ITL against what the server really did (the server
  logs when each request arrived and when each token left, on the same
  ``CLOCK_MONOTONIC`` clock), mean and p99 of the absolute error in ms, the first 256
  requests of the 256 phase starting at once;
- rackscope with 2 worker processes at the same rate, and 1 vs 2 workers at a rate the
  server cannot reach (saturation).

The server holds its total at ``--rate`` tokens/s by setting each stream's inter-token
gap to ``concurrency / rate``. Server and client are pinned to different cores when there
are at least 2. Timings on a shared machine are noisy: compare the ratios, not the absolute
figures.

``--baseline-tree DIR`` measures another revision of the code beside this one: DIR is a copy
of the repository at that revision (``git worktree add DIR REV``, or ``git archive REV | tar
-x -C DIR``). Its client runs through its own code in a child process whose imports resolve
there, interleaved phase by phase with the current one, against the same server, and is
printed as ``baseline``; ``vs baseline`` is its CPU per token over the current one's. Both
sides then see the same machine load, which two separate runs on a shared machine do not.

Two more sections measure whole processes, as a user runs them:

- ``whole``: ``rackscope run --engine openai`` (one process, and ``--workers 2``) and a plain
  aiohttp + orjson client script, each a fresh process streaming ``--whole-requests`` requests
  of ``--tokens`` tokens at concurrency 64; CPU per token is the process's whole CPU time (its
  worker processes included, start-up and imports included) over the tokens the server sent.
  Rounds are interleaved; the medians are printed, with rackscope's CPU per token over
  aiohttp's in the same round (``vs aiohttp``, lower is better here) and, with
  ``--baseline-tree``, the baseline's ``rackscope run`` beside them. The client processes
  cache their bytecode in a temporary folder (as an installed package has it), unless
  ``--no-bytecode-cache``: the imports then count their compilation on every start too.
- ``lockstep``: the timing against a fixed schedule. The server sends the first token 80 ms
  after a request arrives and then one every 8 ms, so 64 streams that start together finish
  and restart together; the TTFT and ITL each client recorded are printed as offsets from that
  schedule (p50, p99, ms; rackscope's from its run record), with the server's own lateness
  against it, for ``rackscope run``, ``rackscope run --workers 2``, aiohttp and the baseline.

    python benchmarks/loadgen.py            # a few minutes
    python benchmarks/loadgen.py --quick    # a smoke run
    python benchmarks/loadgen.py --concurrency 1 256 --baseline-tree ../old
    python benchmarks/loadgen.py --only whole lockstep --baseline-tree ../old
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _server
import orjson

from rackscope.runner.engines.base import Request
from rackscope.runner.engines.openai import OpenAIEngine
from rackscope.runner.records import RequestRecord
from rackscope.runner.workers import run_workers

MODEL = "bench-model"


# -- the baseline client: plain aiohttp + orjson, the way load generators usually read SSE --


async def _aiohttp_run(base_url: str, requests: list[Request], concurrency: int) -> tuple[list[RequestRecord], float]:
    import aiohttp

    url = base_url + "/v1/completions"
    records: list[RequestRecord] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(req: Request) -> RequestRecord:
            payload: dict[str, Any] = {
                "model": MODEL,
                "prompt": req.prompt,
                "max_tokens": req.max_output_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
                **req.extra,
            }
            rec = RequestRecord(req.request_id, start_s=time.perf_counter(), itl_s=[])
            last = 0.0
            async with session.post(url, json=payload, headers={"X-Request-Id": req.request_id}) as resp:
                async for raw in resp.content:
                    ts = time.perf_counter()
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    obj = orjson.loads(data)
                    if obj.get("choices"):
                        if rec.first_token_s is None:
                            rec.first_token_s = ts
                        else:
                            assert rec.itl_s is not None
                            rec.itl_s.append(ts - last)
                        last = ts
                    if obj.get("usage"):
                        rec.output_tokens = obj["usage"]["completion_tokens"]
                        rec.output_tokens_method = "usage"
            rec.end_s = time.perf_counter()
            rec.ok = resp.status == 200
            return rec

        async def worker(queue: list[Request]) -> None:
            while queue:
                records.append(await one(queue.pop()))

        # Warm the pool like run_workers does, so neither client pays for connects.
        warm = [Request(f"warm{i}", prompt="w", max_output_tokens=1) for i in range(concurrency)]
        await asyncio.gather(*(one(r) for r in warm))
        queue = requests[::-1]
        cpu0 = time.process_time()
        await asyncio.gather(*(worker(queue) for _ in range(concurrency)))
        cpu_s = time.process_time() - cpu0
    return records, cpu_s


def _aiohttp_main(conn: Connection, base_url: str, requests: list[Request], concurrency: int, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    records, cpu_s = asyncio.run(_aiohttp_run(base_url, requests, concurrency))
    conn.send((records, cpu_s))


# -- rackscope phases, in this process's code or in another copy of the repository --------------


def _requests(tag: str, n: int, tokens: int, itl_ms: float, ttft_ms: float) -> list[Request]:
    extra: dict[str, object] = {"itl_ms": itl_ms, "ttft_ms": ttft_ms}
    return [Request(f"{tag}-{i}", prompt="benchmark prompt", max_output_tokens=tokens, extra=extra) for i in range(n)]


def _run_phase(phase: dict[str, Any]) -> tuple[list[RequestRecord], float, float]:
    """One phase through ``run_workers`` (the real code path): records, common start, client CPU."""
    reqs = _requests(phase["tag"], phase["n"], phase["tokens"], phase["itl_ms"], phase["ttft_ms"])
    factory = partial(OpenAIEngine, phase["base_url"], MODEL)
    run = run_workers(reqs, factory, phase["workers"], concurrency=phase["concurrency"], cpus=phase["cpus"])
    return run.records, run.start_s, sum(run.cpu_s)


_RECORD_FIELDS = ("request_id", "start_s", "first_token_s", "end_s", "output_tokens", "ok", "itl_s")


def _run_phase_in(tree: Path, phase: dict[str, Any]) -> tuple[list[RequestRecord], float, float]:
    """The same phase in a child process whose ``rackscope`` is the one in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", json.dumps(phase)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"baseline phase failed:\n{done.stderr}")
    out = json.loads(done.stdout.splitlines()[-1])
    if not Path(out["engine_file"]).resolve().is_relative_to(tree.resolve()):
        # An installed copy took precedence: the comparison would be of this code with itself.
        raise SystemExit(f"baseline imported {out['engine_file']}, not the copy in {tree}")
    records = [RequestRecord(**dict(zip(_RECORD_FIELDS, row, strict=True))) for row in out["records"]]
    return records, out["start_s"], out["cpu_s"]


def _phase_main(spec: str) -> int:
    """``--phase``: run one phase and print what ``_run_phase_in`` reads, as one JSON line."""
    records, start_s, cpu_s = _run_phase(json.loads(spec))
    rows = [[getattr(r, f) for f in _RECORD_FIELDS] for r in records]
    engine_file = sys.modules[OpenAIEngine.__module__].__file__
    print(json.dumps({"engine_file": engine_file, "start_s": start_s, "cpu_s": cpu_s, "records": rows}))
    return 0


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    client: str
    tokens: int
    wall_s: float
    cpu_s: float
    ttft_err_ms: list[float]
    itl_err_ms: list[float]
    lag_ms: list[float]
    burst_ttft_err_ms: list[float]
    server_late_ms: list[float]
    bad: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_us_per_token(self) -> float:
        return self.cpu_s / self.tokens * 1e6 if self.tokens else math.nan


def _p99(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _mean_abs(values: list[float]) -> float:
    return statistics.fmean(abs(v) for v in values) if values else math.nan


def _compare(
    records: list[RequestRecord],
    server: dict[str, tuple[float, list[float]]],
    burst: int,
    ttft_ms: float,
    itl_ms: float,
) -> tuple[list[float], list[float], list[float], list[float], list[float], int]:
    """Client timestamps against the server's log: TTFT error, ITL error, per-token lag, and
    how late the server itself was against its schedule."""
    ttft: list[float] = []
    itl: list[float] = []
    lag: list[float] = []
    burst_ttft: list[float] = []
    late: list[float] = []
    bad = 0
    first_starts = sorted(records, key=lambda r: r.start_s)[:burst]
    burst_ids = {r.request_id for r in first_starts}
    for rec in records:
        entry = server.get(rec.request_id)
        if not rec.ok or entry is None or rec.first_token_s is None or rec.itl_s is None:
            bad += 1
            continue
        recv_s, sends = entry
        arrivals = [rec.first_token_s]
        for gap in rec.itl_s:
            arrivals.append(arrivals[-1] + gap)
        if len(arrivals) != len(sends):
            bad += 1
            continue
        err = ((rec.first_token_s - rec.start_s) - (sends[0] - recv_s)) * 1e3
        ttft.append(err)
        if rec.request_id in burst_ids:
            burst_ttft.append(err)
        for k in range(1, len(sends)):
            itl.append(((arrivals[k] - arrivals[k - 1]) - (sends[k] - sends[k - 1])) * 1e3)
        lag.extend((a - s) * 1e3 for a, s in zip(arrivals, sends, strict=True))
        late.extend((s - recv_s) * 1e3 - ttft_ms - k * itl_ms for k, s in enumerate(sends))
    return ttft, itl, lag, burst_ttft, late, bad


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = mp.get_context("spawn")
        cores = sorted(os.sched_getaffinity(0))
        self.server_cpu = cores[-1] if len(cores) >= 2 else None
        self.client_cpus = [c for c in cores if c != self.server_cpu] or cores
        self.ctrl, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(
            target=_server.serve, args=(child, MODEL, args.ttft_ms / 1e3, 0.0, self.server_cpu), daemon=True
        )
        self.proc.start()
        self.port = int(self.ctrl.recv())
        self.base_url = f"http://127.0.0.1:{self.port}"

    def close(self) -> float:
        self.ctrl.send("stop")
        server_cpu_s: float = self.ctrl.recv()
        self.proc.join(timeout=5)
        return server_cpu_s

    def set_timing(self, ttft_s: float, itl_s: float) -> None:
        """The schedule of requests that do not carry their own (whole-process clients)."""
        self.ctrl.send(("timing", ttft_s, itl_s))
        assert self.ctrl.recv() == "ok"

    def server_log(self) -> dict[str, tuple[float, list[float]]]:
        self.ctrl.send("stats")
        log: dict[str, tuple[float, list[float]]] = self.ctrl.recv()
        return log

    def requests(self, tag: str, concurrency: int, itl_ms: float, n: int) -> list[Request]:
        return _requests(tag, n, self.args.tokens, itl_ms, self.args.ttft_ms)

    def n_requests(self, concurrency: int) -> int:
        """Enough for ``duration`` seconds at ``rate``, in whole waves, at least two."""
        waves: int = math.ceil(self.args.rate * self.args.duration / self.args.tokens / concurrency)
        return max(2, waves) * concurrency

    def rackscope(
        self, label: str, concurrency: int, itl_ms: float, workers: int = 1, tree: Path | None = None
    ) -> Result:
        """``tree``: run the client of that copy of the repository instead of this one."""
        tag = f"{'base' if tree else 'rs'}{workers}-{label}"
        phase = {
            "base_url": self.base_url, "tag": tag, "concurrency": concurrency, "itl_ms": itl_ms,
            "n": self.n_requests(concurrency), "tokens": self.args.tokens, "ttft_ms": self.args.ttft_ms,
            "workers": workers, "cpus": self.client_cpus,
        }  # fmt: skip
        self.server_log()  # drop what earlier phases left
        records, start_s, cpu_s = _run_phase(phase) if tree is None else _run_phase_in(tree, phase)
        log = self.server_log()
        tokens = sum(r.output_tokens for r in records if r.ok)
        wall_s = max(r.end_s or 0.0 for r in records) - start_s
        ttft, itl, lag, burst, late, bad = _compare(records, log, concurrency, self.args.ttft_ms, itl_ms)
        name = "baseline" if tree else "rackscope"
        name += "" if workers == 1 else f" x{workers}"
        return Result(label, name, tokens, wall_s, cpu_s, ttft, itl, lag, burst, late, bad)

    def aiohttp(self, label: str, concurrency: int, itl_ms: float) -> Result:
        reqs = self.requests(f"aio-{label}", concurrency, itl_ms, self.n_requests(concurrency))
        self.server_log()
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(
            target=_aiohttp_main, args=(child, self.base_url, reqs, concurrency, self.client_cpus[0]), daemon=True
        )
        proc.start()
        records, cpu_s = parent.recv()
        proc.join(timeout=10)
        log = self.server_log()
        tokens = sum(r.output_tokens for r in records if r.ok)
        wall_s = max(r.end_s or 0.0 for r in records) - min(r.start_s for r in records)
        ttft, itl, lag, burst, late, bad = _compare(records, log, concurrency, self.args.ttft_ms, itl_ms)
        return Result(label, "aiohttp", tokens, wall_s, cpu_s, ttft, itl, lag, burst, late, bad)


def _row(r: Result, baseline: Result | None, older: Result | None = None) -> str:
    ratio = f"{baseline.cpu_us_per_token / r.cpu_us_per_token:5.2f}x" if baseline and r is not baseline else "    - "
    vs_old = f"{older.cpu_us_per_token / r.cpu_us_per_token:5.2f}x" if older else "    - "
    return (
        f"{r.label:<14} {r.client:<13} {r.tokens_per_s:>9,.0f} {r.cpu_us_per_token:>8.2f} {ratio:>9} {vs_old:>11} "
        f"{_mean_abs(r.ttft_err_ms):>7.3f} {_p99([abs(v) for v in r.ttft_err_ms]):>7.3f} "
        f"{_mean_abs(r.itl_err_ms):>7.3f} {_p99([abs(v) for v in r.itl_err_ms]):>7.3f} "
        f"{statistics.fmean(r.lag_ms) if r.lag_ms else math.nan:>7.3f} {_p99(r.lag_ms):>7.3f} "
        f"{_p99(r.server_late_ms):>8.3f} {r.bad:>4}"
    )


# -- whole processes: the client as a user runs it, start-up included ----------------------------

# A plain aiohttp + orjson client as its own script, so that its process imports what such a client
# imports and nothing of rackscope: a closed loop of CONCURRENCY streams over N requests; each
# content event decoded with orjson and time-stamped; TTFT and every token gap written out at the
# end, as rackscope writes its record.
AIOHTTP_CLIENT = r"""
import asyncio, json, sys, time
import aiohttp, orjson

async def main(url, model, n, concurrency, tokens, out):
    ttft, itl = [], []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def one(i):
            payload = {"model": model, "prompt": "benchmark prompt " * 16, "max_tokens": tokens, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True}
            start = time.perf_counter()
            last = None
            headers = {"X-Request-Id": f"aio-{i}"}
            async with session.post(url + "/v1/completions", json=payload, headers=headers) as resp:
                async for raw in resp.content:
                    ts = time.perf_counter()
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    obj = orjson.loads(data)
                    if obj.get("choices"):
                        if last is None:
                            ttft.append(ts - start)
                        else:
                            itl.append(ts - last)
                        last = ts
        queue = list(range(n))[::-1]
        async def worker():
            while queue:
                await one(queue.pop())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    with open(out, "w") as f:
        json.dump({"ttft_s": ttft, "itl_s": itl}, f)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]))
"""


# The least any client that reads each token as it arrives can cost here: the same uvloop
# transport as rackscope, a request written per connection in turn, and every read thrown away
# (no parsing, no timestamps, no record). What rackscope costs above it is its own work; the
# rest is the event loop and the kernel (one socket read per token, and the ACK it sends).
FLOOR_CLIENT = r"""
import asyncio, json, sys
from urllib.parse import urlsplit
import uvloop

async def main(url, model, n, concurrency, tokens):
    parts = urlsplit(url)
    body = json.dumps({"model": model, "prompt": "benchmark prompt " * 16, "max_tokens": tokens, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Id: floor-%d\r\n\r\n").encode()
    left = [n]
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    open_conns = [concurrency]

    class Reader(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.next()

        def next(self):
            if left[0] > 0:
                left[0] -= 1
                self.transport.write(head % left[0] + body)
            else:
                self.transport.close()
                open_conns[0] -= 1
                if not open_conns[0]:
                    finished.set_result(None)

        def data_received(self, data):
            if data.endswith(b"0\r\n\r\n"):
                self.next()

    for _ in range(concurrency):
        await loop.create_connection(Reader, parts.hostname, parts.port)
    await finished

uvloop.install()
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
"""


@dataclass
class Whole:
    """One client process: its whole CPU time, the tokens the server sent it, its timings."""

    client: str
    cpu_s: float
    sys_s: float  # of cpu_s, in the kernel (socket reads, the ACKs they send, wake-ups)
    tokens: int
    wall_s: float
    ttft_s: dict[str, float]  # p50, p99
    itl_s: dict[str, float]
    server_late_ms: dict[str, float]

    @property
    def us_per_token(self) -> float:
        return self.cpu_s / self.tokens * 1e6 if self.tokens else math.nan


def _quantiles(values: list[float]) -> dict[str, float]:
    from rackscope.runner.results.stats import percentile  # the run record's own percentiles

    ordered = sorted(values)
    if not ordered:
        return {"p50": math.nan, "p99": math.nan}
    return {"p50": percentile(ordered, 50.0), "p99": percentile(ordered, 99.0)}


ServerLog = dict[str, tuple[float, list[float]]]  # request id: (arrival, each token's send)


class Processes:
    """Runs whole client processes against the bench's server and measures each."""

    def __init__(self, bench: Bench, tree: Path | None, bytecode_cache: bool, workdir: Path) -> None:
        self.bench = bench
        self.tree = tree
        self.workdir = workdir
        self.env = dict(os.environ)
        if bytecode_cache:
            # As an installed package: bytecode compiled once, then read (in a folder of our own,
            # not beside the sources).
            self.env.pop("PYTHONDONTWRITEBYTECODE", None)
            self.env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
        self.cpu = bench.client_cpus
        # Each side imports its own tree: this one's or the baseline's first on the path, and the
        # processes run in the work folder (``python -c`` and ``-m`` put the current folder first).
        self.root = Path(__file__).resolve().parents[1]
        # The record of a run against our server needs no scrape of its /metrics, when the code
        # has that scrape at all.
        self.flags = {tree_or_none: self._extra_flags(tree_or_none) for tree_or_none in (None, tree)}

    @staticmethod
    def _extra_flags(tree: Path | None) -> list[str]:
        config = (tree or Path(__file__).resolve().parents[1]) / "runner" / "config.py"
        return ["--no-engine-metrics"] if "--no-engine-metrics" in config.read_text() else []

    def check_tree(self) -> None:
        """The baseline's processes must import the baseline's code, not an installed copy."""
        for tree in (None, self.tree) if self.tree else (None,):
            want = (tree or self.root).resolve()
            code = "import rackscope.runner.engines.openai.engine as e; print(e.__file__)"
            out = subprocess.run([sys.executable, "-c", code], env=self._env(tree), cwd=self.workdir,
                                 capture_output=True, text=True, check=True)
            if not Path(out.stdout.strip()).resolve().is_relative_to(want):
                raise SystemExit(f"a client imported {out.stdout.strip()}, not the copy in {want}")

    def _env(self, tree: Path | None) -> dict[str, str]:
        return {**self.env, "PYTHONPATH": str((tree or self.root).resolve())}

    def _measure(self, cmd: list[str], env: dict[str, str]) -> tuple[float, float, float, ServerLog]:
        """Run ``cmd`` on the client cores; its CPU (children included) and wall time, and the
        server's log of what it sent."""
        self.bench.server_log()  # drop what came before
        cpus = set(self.cpu)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=env, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),  # noqa: PLW1509 - no threads here yet
        )  # fmt: skip
        assert proc.stderr is not None
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{err.decode()[-3000:]}")
        return usage.ru_utime + usage.ru_stime, usage.ru_stime, wall_s, self.bench.server_log()

    def rackscope(self, label: str, requests: int, tokens: int, concurrency: int, workers: int,
                  schedule: tuple[float, float], baseline: bool = False) -> Whole:
        tree = self.tree if baseline else None
        env = self._env(tree)
        out = self.workdir / f"{label}.json"
        cmd = [
            sys.executable, "-m", "rackscope.cli", "--log-level", "warning", "run", "--engine", "openai",
            "--url", self.bench.base_url, "--model", MODEL, "--scenario", "concurrency",
            "--concurrency", str(concurrency), "--requests", str(requests), "--output-len", str(tokens),
            "--input-len", "64", "--workers", str(workers), "--output", str(out), *self.flags[tree],
        ]  # fmt: skip
        cpu_s, sys_s, wall_s, log = self._measure(cmd, env)
        summary = json.loads(out.read_text())["summary"]
        ttft = {q: summary["ttft_s"][q] for q in ("p50", "p99")}
        itl = {q: summary["itl_s"][q] for q in ("p50", "p99")}
        late = _server.lateness_ms(log, *schedule)
        return Whole(label, cpu_s, sys_s, sum(len(sends) for _, sends in log.values()), wall_s, ttft, itl,
                     _quantiles([v / 1e3 for v in late]))

    def floor(self, requests: int, tokens: int, concurrency: int, schedule: tuple[float, float]) -> Whole:
        cmd = [sys.executable, "-c", FLOOR_CLIENT, self.bench.base_url, MODEL, str(requests), str(concurrency),
               str(tokens)]
        cpu_s, sys_s, wall_s, log = self._measure(cmd, self.env)
        nan = {"p50": math.nan, "p99": math.nan}
        late = _server.lateness_ms(log, *schedule)
        return Whole("floor", cpu_s, sys_s, sum(len(sends) for _, sends in log.values()), wall_s, nan, nan,
                     _quantiles([v / 1e3 for v in late]))

    def aiohttp(self, requests: int, tokens: int, concurrency: int, schedule: tuple[float, float]) -> Whole:
        out = self.workdir / "aiohttp.json"
        cmd = [sys.executable, "-c", AIOHTTP_CLIENT, self.bench.base_url, MODEL, str(requests), str(concurrency),
               str(tokens), str(out)]
        cpu_s, sys_s, wall_s, log = self._measure(cmd, self.env)
        got = json.loads(out.read_text())
        late = _server.lateness_ms(log, *schedule)
        return Whole("aiohttp", cpu_s, sys_s, sum(len(sends) for _, sends in log.values()), wall_s,
                     _quantiles(got["ttft_s"]), _quantiles(got["itl_s"]), _quantiles([v / 1e3 for v in late]))


def _whole_section(procs: Processes, args: argparse.Namespace) -> None:
    c = 64
    schedule = (args.ttft_ms / 1e3, c / args.rate)
    procs.bench.set_timing(*schedule)
    n = args.whole_requests
    clients = ["rackscope", "rackscope --workers 2", "aiohttp"] + (["baseline"] if procs.tree else []) + ["floor"]
    rounds: dict[str, list[Whole]] = {name: [] for name in clients}
    # One untimed start of each, so that bytecode caches exist before any is measured.
    procs.rackscope("warm", c, 8, c, 1, schedule)
    if procs.tree:
        procs.rackscope("warm-base", c, 8, c, 1, schedule, baseline=True)
    procs.aiohttp(c, 8, c, schedule)
    for _ in range(args.rounds):
        rounds["rackscope"].append(procs.rackscope("rs1", n, args.tokens, c, 1, schedule))
        rounds["rackscope --workers 2"].append(procs.rackscope("rs2", n, args.tokens, c, 2, schedule))
        rounds["aiohttp"].append(procs.aiohttp(n, args.tokens, c, schedule))
        if procs.tree:
            rounds["baseline"].append(procs.rackscope("base", n, args.tokens, c, 1, schedule, baseline=True))
        rounds["floor"].append(procs.floor(n, args.tokens, c, schedule))
    print()
    print(f"whole processes: {n} requests x {args.tokens} tokens at concurrency {c}, server at "
          f"{args.rate:,.0f} tokens/s; CPU = the process's user + system time, workers, start-up and imports "
          f"included; median of {args.rounds} interleaved rounds"
          + ("" if args.bytecode_cache else "; bytecode compiled on every start"))
    head = (f"{'client':<24} {'CPU us/token':>12} {'of it sys':>9} {'vs aiohttp':>10} {'vs baseline':>11} "
            f"{'tokens/s':>10} {'CPU s':>7}")
    print(head)
    print("-" * len(head))
    aio = rounds["aiohttp"]
    for name in clients:
        runs = rounds[name]
        us = statistics.median(r.us_per_token for r in runs)
        vs_aio = statistics.median(r.us_per_token / a.us_per_token for r, a in zip(runs, aio, strict=True))
        vs_base = "-"
        if procs.tree and name != "baseline":
            base = rounds["baseline"]
            ratios = [r.us_per_token / b.us_per_token for r, b in zip(runs, base, strict=True)]
            vs_base = f"{statistics.median(ratios):.2f}"
        rate = statistics.median(r.tokens / r.wall_s for r in runs)
        cpu = statistics.median(r.cpu_s for r in runs)
        sys_us = statistics.median(r.sys_s / r.tokens * 1e6 for r in runs)
        print(f"{name:<24} {us:>12.2f} {sys_us:>9.2f} {vs_aio:>10.2f} {vs_base:>11} {rate:>10,.0f} {cpu:>7.2f}")
    print("vs aiohttp / vs baseline: this client's CPU per token over theirs in the same round (lower is better)")
    print("floor: a uvloop client that reads every token as it comes and does nothing else with it (no parsing,")
    print("       no timestamps, no record): the event loop's and the kernel's share of any such client here")
    if len(procs.cpu) < 2:
        print(f"note: the client has one core here (cpu {procs.cpu[0]}; the server holds another): two workers share "
              "it, so --workers 2 shows the cost of a second process, not a speed-up")


def _lockstep_section(procs: Processes, args: argparse.Namespace) -> None:
    c = 64
    ttft_s, itl_s = 0.080, 0.008
    schedule = (ttft_s, itl_s)
    procs.bench.set_timing(ttft_s, itl_s)
    n = c * args.lockstep_waves
    tokens = args.lockstep_tokens
    runs = [procs.rackscope("lock-rs1", n, tokens, c, 1, schedule),
            procs.rackscope("lock-rs2", n, tokens, c, 2, schedule)]
    names = ["rackscope", "rackscope --workers 2"]
    runs.append(procs.aiohttp(n, tokens, c, schedule))
    names.append("aiohttp")
    if procs.tree:
        runs.append(procs.rackscope("lock-base", n, tokens, c, 1, schedule, baseline=True))
        names.append("baseline")
    print()
    print(f"lockstep: {c} streams of {tokens} tokens, {args.lockstep_waves} waves that finish and restart "
          f"together; the server sends the first token {ttft_s * 1e3:g} ms after a request arrives, then one every "
          f"{itl_s * 1e3:g} ms. Offsets from that schedule, ms (rackscope's from its run record):")
    head = (f"{'client':<24} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8}   "
            f"{'server late p50':>15} {'p99':>7}")
    print(head)
    print("-" * len(head))
    for name, r in zip(names, runs, strict=True):
        print(f"{name:<24} {(r.ttft_s['p50'] - ttft_s) * 1e3:>+9.3f} {(r.ttft_s['p99'] - ttft_s) * 1e3:>+8.3f} "
              f"{(r.itl_s['p50'] - itl_s) * 1e3:>+8.3f} {(r.itl_s['p99'] - itl_s) * 1e3:>+8.3f}   "
              f"{r.server_late_ms['p50'] * 1e3:>15.3f} {r.server_late_ms['p99'] * 1e3:>7.3f}")


def _inprocess_section(bench: Bench, args: argparse.Namespace, tree: Path | None) -> None:
    # (result, the aiohttp result of its phase, the baseline result it is compared with)
    results: list[tuple[Result, Result | None, Result | None]] = []
    sat_old: Result | None = None
    for c in args.concurrency:
        itl_ms = c / args.rate * 1e3
        base = bench.aiohttp(f"C={c}", c, itl_ms)
        old = bench.rackscope(f"C={c}", c, itl_ms, tree=tree) if tree else None
        ours = bench.rackscope(f"C={c}", c, itl_ms)
        results += [(base, None, None)] + ([(old, base, None)] if old else []) + [(ours, base, old)]
    c = max(args.concurrency)
    two = bench.rackscope(f"C={c}", c, c / args.rate * 1e3, workers=2)
    results.append((two, None, None))
    sat_itl_ms = 0.25
    if tree:
        sat_old = bench.rackscope("saturate", c, sat_itl_ms, workers=1, tree=tree)
    sat_one = bench.rackscope("saturate", c, sat_itl_ms, workers=1)
    sat_two = bench.rackscope("saturate", c, sat_itl_ms, workers=2)

    head = (
        f"{'phase':<14} {'client':<13} {'tokens/s':>9} {'CPU us/t':>8} {'vs aiohttp':>9} {'vs baseline':>11} "
        f"{'TTFTerr':>7} {'p99':>7} {'ITLerr':>7} {'p99':>7} {'lag':>7} {'p99':>7} {'srv late':>8} {'bad':>4}"
    )
    print()
    print("in process: client CPU from the common start to the end of the run (start-up not included)")
    print("in ms: TTFTerr / ITLerr = |client - server| for TTFT and each inter-token gap (mean, p99);")
    print("       lag = token arrival at the client - its send at the server; srv late = p99 of the server's")
    print("       sends behind its own schedule (the errors are measured against the real sends)")
    print(head)
    print("-" * len(head))
    for r, baseline, older in results:
        print(_row(r, baseline, older))
    print()
    for r, _, _ in results:
        if r.burst_ttft_err_ms and r.label == f"C={max(args.concurrency)}":
            print(
                f"{r.client:<13} first {len(r.burst_ttft_err_ms)} requests started at once: TTFT error mean "
                f"{_mean_abs(r.burst_ttft_err_ms):.3f} ms, p99 {_p99([abs(v) for v in r.burst_ttft_err_ms]):.3f} ms, "
                f"max {max(abs(v) for v in r.burst_ttft_err_ms):.3f} ms"
            )
    print()
    print(
        f"saturation (C={c}, server asked for {c / sat_itl_ms * 1e3:,.0f} tokens/s): "
        f"1 worker {sat_one.tokens_per_s:,.0f} tokens/s at {sat_one.cpu_us_per_token:.2f} us/token; "
        f"2 workers {sat_two.tokens_per_s:,.0f} tokens/s at {sat_two.cpu_us_per_token:.2f} us/token "
        f"(x{sat_two.tokens_per_s / sat_one.tokens_per_s:.2f})"
    )
    if sat_old is not None:
        print(
            f"  baseline, 1 worker: {sat_old.tokens_per_s:,.0f} tokens/s at {sat_old.cpu_us_per_token:.2f} us/token "
            f"(its CPU per token / the current one's: {sat_old.cpu_us_per_token / sat_one.cpu_us_per_token:.2f})"
        )
    if len(bench.client_cpus) < 2:
        print("  note: the workers share one core here (the server holds the other): overhead, not speed-up")


SECTIONS = ("inprocess", "whole", "lockstep")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=60000.0, help="server's total tokens/s")
    parser.add_argument("--tokens", type=int, default=256, help="output tokens per request")
    parser.add_argument("--ttft-ms", type=float, default=1.0, help="server's time to first token")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per phase, about")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--quick", action="store_true", help="short phases, for a smoke run")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--whole-requests", type=int, default=1280, help="requests per whole-process run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of whole-process runs")
    parser.add_argument("--lockstep-tokens", type=int, default=96, help="tokens per lockstep stream")
    parser.add_argument("--lockstep-waves", type=int, default=3, help="waves of 64 lockstep streams")
    parser.add_argument("--no-bytecode-cache", dest="bytecode_cache", action="store_false",
                        help="whole processes compile their imports on every start (no bytecode cache)")
    parser.add_argument(
        "--baseline-tree", type=Path, metavar="DIR",
        help="a copy of the repository at another revision, measured beside this one (see above)",
    )  # fmt: skip
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: one phase, run in a baseline tree
    args = parser.parse_args(argv)
    if args.phase:
        return _phase_main(args.phase)
    tree: Path | None = args.baseline_tree
    if tree is not None and not (tree / "rackscope" / "__init__.py").is_file():
        parser.error(f"--baseline-tree {tree} holds no rackscope package")
    if args.quick:
        args.duration = 0.3
        args.tokens = min(args.tokens, 64)
        args.whole_requests = min(args.whole_requests, 128)
        args.rounds = 1
        args.lockstep_tokens = min(args.lockstep_tokens, 24)
        args.lockstep_waves = min(args.lockstep_waves, 2)

    bench = Bench(args)
    print(
        f"server: {args.rate:,.0f} tokens/s in total, {args.tokens}-token streams, TTFT {args.ttft_ms} ms; "
        f"server on cpu {bench.server_cpu}, client on cpu {bench.client_cpus}; {os.cpu_count()} cpus"
    )
    try:
        if "inprocess" in args.only:
            _inprocess_section(bench, args, tree)
        if "whole" in args.only or "lockstep" in args.only:
            with tempfile.TemporaryDirectory(prefix="loadgen-") as workdir:
                procs = Processes(bench, tree, args.bytecode_cache, Path(workdir))
                procs.check_tree()
                if "whole" in args.only:
                    _whole_section(procs, args)
                if "lockstep" in args.only:
                    _lockstep_section(procs, args)
    finally:
        server_cpu_s = bench.close()
    print(f"server CPU over the run: {server_cpu_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
