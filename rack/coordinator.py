"""Rack runs: one synchronized benchmark run across many agents over their control API,
aggregated into a ``rackscope.rack/1`` record and saved as an auditable results bundle.

The coordinator probes every agent (``GET /v1/node``), picks a common start time far enough
ahead to reach them all, starts the same run on each (``POST /v1/runs`` with ``start_at``),
polls them, and collects each node's record, per-request JSONL and log as it finishes. A node
that fails, refuses or vanishes is marked in the record and the others carry on; the rack
record is then ``complete: false``.

Bundle layout (every file written atomically; each is saved the moment it arrives, and
``rack.json`` is rewritten after every change, so an interruption loses nothing collected)::

    OUTPUT/rack.json                          the rack record (rackscope.rack/1)
    OUTPUT/config.json                        what was asked: agents, run config, timings
    OUTPUT/nodes/NODE/node.json               the agent's identity at the start
    OUTPUT/nodes/NODE/run.json                the agent's last view of the run
    OUTPUT/nodes/NODE/RUN_ID.json             the node's run record (rackscope.run/1)
    OUTPUT/nodes/NODE/RUN_ID.requests.jsonl   its per-request rows
    OUTPUT/nodes/NODE/agent.log               the agent's recent log lines
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import statistics
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from rackscope import __version__
from rackscope.errors import ConfigError, RackscopeError, ResultError, RunError
from rackscope.runner.results import atomic_writer, distribution, load_requests, utc_iso, write_json

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

SCHEMA = "rackscope.rack/1"
RACK_FILE = "rack.json"
CONFIG_FILE = "config.json"
NODES_DIR = "nodes"

DEFAULT_STRAGGLER_THRESHOLD = 0.95  # a node below 95 % of the median node is a straggler
MIN_LEAD_TIME_S = 1.0  # even on loopback, every POST must land before the common start
LEAD_TIME_RTT_FACTOR = 10.0  # start_at = now + max(MIN, factor x slowest probe + per-agent cost)
LEAD_TIME_PER_AGENT_S = 0.02  # starting a run (engine set-up) costs each agent a little
DEFAULT_POLL_INTERVAL_S = 0.5
DEFAULT_LOST_AFTER_S = 10.0  # an agent unreachable this long mid-run is marked lost
DEFAULT_REQUEST_TIMEOUT_S = 10.0
RECORD_WAIT_S = 10.0  # after a run ends, how long its record may take to appear
FINISH_GRACE_S = 60.0  # a timed run may overrun its duration by this much (+50 %) before it is given up
CANCEL_TIMEOUT_S = 3.0
DOWNLOAD_CHUNK_BYTES = 1 << 16
FINAL_STATUSES = ("completed", "failed", "cancelled")

JsonDict = dict[str, Any]


# --- configuration ------------------------------------------------------------------------------
def normalize_agent_url(text: str) -> str:
    """``host:port`` or ``http(s)://host:port[/prefix]`` -> a base URL without trailing slash."""
    raw = text.strip()
    if not raw:
        raise ConfigError("empty agent URL")
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"bad agent URL {text!r}: expected http://HOST:PORT")
    try:
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError:
        raise ConfigError(f"bad port in agent URL {text!r}") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"agent URL {text!r} must not carry a query or fragment")
    return raw.rstrip("/")


def parse_agents(urls: str | None = None, agents_file: str | Path | None = None) -> list[str]:
    """Agent base URLs from a comma-separated list and/or a file (one per line, ``#`` comments)."""
    found: list[str] = []
    if urls:
        found.extend(u for u in (p.strip() for p in urls.split(",")) if u)
    if agents_file is not None:
        path = Path(agents_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read agents file {path}: {exc.strerror or exc}") from exc
        for line in text.splitlines():
            entry = line.split("#", 1)[0].strip()
            if entry:
                found.append(entry)
    agents = [normalize_agent_url(u) for u in found]
    if not agents:
        raise ConfigError("no agents given: pass --agents URL,URL,... or --agents-file FILE")
    duplicates = sorted({a for a in agents if agents.count(a) > 1})
    if duplicates:
        raise ConfigError(f"agent listed twice: {', '.join(duplicates)}")
    return agents


@dataclass
class RackRunSpec:
    """Everything one rack run needs. ``run`` holds the RunConfig fields sent to every agent."""

    agents: list[str]
    run: JsonDict
    output_dir: Path
    token: str | None = None
    rack_run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    lead_time_s: float | None = None  # None: derived from how long the agents take to answer
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    lost_after_s: float = DEFAULT_LOST_AFTER_S
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    straggler_threshold: float = DEFAULT_STRAGGLER_THRESHOLD
    timeout_s: float | None = None  # None: duration + 50 % + FINISH_GRACE_S for timed runs, else none

    def validate(self) -> RackRunSpec:
        if not self.agents:
            raise ConfigError("a rack run needs at least one agent")
        if not 0.0 < self.straggler_threshold <= 1.0:
            raise ConfigError(f"--straggler-threshold must be in (0, 1], not {self.straggler_threshold}")
        if self.lead_time_s is not None and not 0.0 <= self.lead_time_s <= 3600.0:
            raise ConfigError(f"--lead-time must be 0-3600 seconds, not {self.lead_time_s}")
        for name in ("poll_interval_s", "lost_after_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.rack_run_id):
            raise ConfigError(f"run id {self.rack_run_id!r}: use 1-64 letters, digits, '.', '_' or '-'")
        return self

    def deadline_after_start_s(self) -> float | None:
        if self.timeout_s is not None:
            return self.timeout_s
        duration = self.run.get("duration_s")
        if isinstance(duration, int | float) and duration > 0:
            return float(duration) * 1.5 + FINISH_GRACE_S
        return None


# --- per-node state -------------------------------------------------------------------------------
@dataclass
class NodeRun:
    """What the coordinator knows about one agent. ``status`` is the agent's run status, or
    ``unreachable`` (never answered), ``rejected`` (refused the run), ``lost`` (vanished
    mid-run) or ``timeout`` (overran the deadline)."""

    agent: str
    key: str = ""  # the node's folder in the bundle (its node name, made unique)
    identity: JsonDict | None = None
    status: str = "probing"
    error: str | None = None
    view: JsonDict | None = None
    record: JsonDict | None = None
    files: dict[str, str] = field(default_factory=dict)
    probe_rtt_s: float | None = None
    last_seen: float = 0.0  # monotonic time of the last answer

    @property
    def node(self) -> str:
        if self.identity and isinstance(self.identity.get("node"), str):
            return str(self.identity["node"])
        return self.key or self.agent

    @property
    def ok(self) -> bool:
        return self.status == "completed" and self.record is not None


# --- aggregation ------------------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _spread(values: Sequence[float]) -> JsonDict:
    if not values:
        return {"count": 0, "min": None, "median": None, "mean": None, "max": None}
    return {
        "count": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "mean": math.fsum(values) / len(values),
        "max": max(values),
    }


def node_entry(n: NodeRun) -> JsonDict:
    """The per-node summary carried in the rack record's ``nodes`` list."""
    identity = n.identity or {}
    summary: Mapping[str, Any] = {}
    if n.record is not None and isinstance(n.record.get("summary"), dict):
        summary = n.record["summary"]
    elif n.view is not None and isinstance(n.view.get("summary"), dict):
        summary = n.view["summary"]
    view = n.view or {}
    gpus = _num(summary.get("gpus")) or _num(identity.get("gpus"))
    return {
        "node": n.node,
        "key": n.key,
        "rack": identity.get("rack"),
        "agent": n.agent,
        "status": n.status,
        "error": n.error,
        "run_id": view.get("run_id"),
        "gpus": int(gpus) if gpus is not None else None,
        "gpu_model": identity.get("gpu_model"),
        "simulated": identity.get("simulated"),
        "source": identity.get("source"),
        "started_at": _num(view.get("started_at")),
        "ended_at": _num(view.get("ended_at")),
        "duration_s": _num(summary.get("duration_s")),
        "output_tokens": _num(summary.get("output_tokens")),
        "output_tokens_per_s": _num(summary.get("output_tokens_per_s")),
        "output_tokens_per_s_per_gpu": _num(summary.get("output_tokens_per_s_per_gpu")),
        "requests_completed": _num(summary.get("requests_completed")),
        "requests_failed": _num(summary.get("requests_failed")),
        "energy_j": _num(summary.get("energy_j")),
        "power_w": _num(summary.get("average_power_w")),
        "output_tokens_per_j": _num(summary.get("output_tokens_per_j")),
        "complete": bool(summary.get("complete", False)) and n.ok,
        "straggler": False,
        "fraction_of_median": None,
        "files": dict(n.files),
    }


def summarize_nodes(nodes: Sequence[JsonDict], *, threshold: float = DEFAULT_STRAGGLER_THRESHOLD) -> JsonDict:
    """The rack summary from per-node entries (``node_entry``). Only nodes whose run completed
    count towards throughput and energy; the others are listed in ``failed_nodes``. Marks the
    stragglers in ``nodes`` in place."""
    measured = [n for n in nodes if n["status"] == "completed" and n["output_tokens_per_s"] is not None]
    rates = [float(n["output_tokens_per_s"]) for n in measured]
    spread = _spread(rates)
    median = spread["median"]
    stragglers = []
    for n in measured:
        if median:
            fraction = n["output_tokens_per_s"] / median
            n["fraction_of_median"] = fraction
            n["straggler"] = fraction < threshold
            if n["straggler"]:
                stragglers.append(
                    {
                        "node": n["node"],
                        "output_tokens_per_s": n["output_tokens_per_s"],
                        "fraction_of_median": fraction,
                        "shortfall_tokens_per_s": median - n["output_tokens_per_s"],
                        "shortfall_fraction": 1.0 - fraction,
                    }
                )
    stragglers.sort(key=lambda s: s["fraction_of_median"])
    with_energy = [n for n in measured if n["energy_j"] is not None]
    energy_j = math.fsum(n["energy_j"] for n in with_energy) if with_energy else None
    tokens_with_energy = math.fsum(n["output_tokens"] or 0.0 for n in with_energy)
    power = [n["power_w"] for n in measured if n["power_w"] is not None]
    gpus_measured = sum(n["gpus"] or 0 for n in measured)
    rack_rate = math.fsum(rates)
    starts = [n["started_at"] for n in measured if n["started_at"] is not None]
    failed = [n for n in nodes if n["status"] != "completed"]
    return {
        "complete": bool(nodes) and not failed and all(n["complete"] for n in nodes),
        "nodes": len(nodes),
        "nodes_completed": len(measured),
        "nodes_failed": len(failed),
        "failed_nodes": [
            {"node": n["node"], "agent": n["agent"], "status": n["status"], "error": n["error"]} for n in failed
        ],
        "gpus": sum(n["gpus"] or 0 for n in nodes),
        "gpus_measured": gpus_measured,
        "output_tokens": math.fsum(n["output_tokens"] or 0.0 for n in measured),
        "output_tokens_per_s": rack_rate,
        "output_tokens_per_s_per_gpu": rack_rate / gpus_measured if gpus_measured else None,
        "node_output_tokens_per_s": spread,
        "requests_completed": int(sum(n["requests_completed"] or 0 for n in measured)),
        "requests_failed": int(sum(n["requests_failed"] or 0 for n in measured)),
        "duration_s": max((n["duration_s"] or 0.0 for n in measured), default=0.0),
        "start_spread_s": max(starts) - min(starts) if starts else None,
        "power_w": math.fsum(power) if power else None,
        "energy_j": energy_j,
        "output_tokens_per_j": tokens_with_energy / energy_j if energy_j else None,
        "straggler_threshold": threshold,
        "stragglers": stragglers,
    }


def rack_timeseries(entries: Sequence[JsonDict], records: Mapping[str, JsonDict]) -> JsonDict | None:
    """Rack output tokens/s and power per 1 s bucket: each completed node's series, shifted
    by its start relative to the earliest node, summed."""
    series = []
    for n in entries:
        record = records.get(n["key"])
        ts = record.get("timeseries") if record else None
        if n["status"] != "completed" or not isinstance(ts, dict) or n["started_at"] is None:
            continue
        series.append((n["started_at"], ts))
    if not series:
        return None
    origin = min(s for s, _ in series)
    bucket_s = float(series[0][1].get("bucket_s") or 1.0)
    length = max(round((s - origin) / bucket_s) + len(ts.get("output_tokens_per_s") or []) for s, ts in series)
    tokens = [0.0] * length
    power: list[float] | None = [0.0] * length
    for start, ts in series:
        shift = round((start - origin) / bucket_s)
        for i, v in enumerate(ts.get("output_tokens_per_s") or []):
            tokens[shift + i] += float(v)
        node_power = ts.get("power_w")
        if node_power is None:
            power = None
        elif power is not None:
            for i, v in enumerate(node_power):
                power[shift + i] += float(v)
    return {
        "bucket_s": bucket_s,
        "t_s": [i * bucket_s for i in range(length)],
        "output_tokens_per_s": tokens,
        "power_w": power,
        "nodes": len(series),
    }


def pooled_latency(request_files: Iterable[Path]) -> JsonDict:
    """Latency distributions over every node's finished requests (from their JSONL rows)."""
    pools: dict[str, list[float]] = {"ttft_s": [], "tpot_s": [], "e2e_s": []}
    for path in request_files:
        for row in load_requests(path):
            if not row.get("ok"):
                continue
            for key, values in pools.items():
                value = row.get(key)
                if isinstance(value, int | float):
                    values.append(float(value))
    return {key: distribution(values) for key, values in pools.items()}


# --- the bundle --------------------------------------------------------------------------------
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A file-name-safe version of an agent-supplied name (never a path)."""
    cleaned = _SAFE.sub("_", text).strip("._") or "node"
    return cleaned[:64]


class Bundle:
    """The results folder of one rack run; every write is atomic (temp file + ``os.replace``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if (self.root / RACK_FILE).exists():
            raise ConfigError(f"{self.root} already holds a rack run ({RACK_FILE}); choose another --output")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.root}: {exc.strerror or exc}") from exc

    def path(self, relative: str) -> Path:
        return self.root / relative

    def _parent(self, relative: str) -> Path:
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_json(self, relative: str, obj: Any) -> None:
        write_json(self._parent(relative), obj)

    def write_bytes(self, relative: str, data: bytes) -> None:
        target = self._parent(relative)
        try:
            with atomic_writer(target) as handle:
                handle.write(data)
        except OSError as exc:
            raise ResultError(f"cannot write {target}: {exc.strerror or exc}") from exc


# --- talking to agents -----------------------------------------------------------------------------
class AgentClient:
    """One agent's control API. Transport failures become ``RunError``; HTTP statuses are
    returned to the caller, which knows what each means for the run."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str | None) -> None:
        self.session = session
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        import aiohttp

        data = orjson.dumps(body) if body is not None else None
        headers = {**self.headers, "Content-Type": "application/json"} if data is not None else self.headers
        try:
            async with self.session.request(method, self.base_url + path, data=data, headers=headers) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RunError(f"{self.base_url}: {_describe(exc)}") from exc

    async def json(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = await self.call(method, path, body)
        if not 200 <= status < 300:
            raise RunError(f"{self.base_url}{path}: HTTP {status}: {_detail(payload)}")
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise RunError(f"{self.base_url}{path}: answer is not JSON") from exc

    async def download(self, path: str, target: Path) -> int | None:
        """Stream a body into ``target`` atomically; None when the agent has no such thing."""
        import aiohttp

        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            async with self.session.get(self.base_url + path, headers=self.headers) as resp:
                if resp.status in (404, 409):
                    return None
                if resp.status != 200:
                    raise RunError(f"{self.base_url}{path}: HTTP {resp.status}: {_detail(await resp.read())}")
                size = 0
                with atomic_writer(target) as handle:
                    async for chunk in resp.content.iter_chunked(DOWNLOAD_CHUNK_BYTES):
                        handle.write(chunk)
                        size += len(chunk)
                return size
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RunError(f"{self.base_url}{path}: {_describe(exc)}") from exc
        except OSError as exc:
            raise ResultError(f"cannot write {target}: {exc.strerror or exc}") from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _detail(payload: bytes) -> str:
    with contextlib.suppress(orjson.JSONDecodeError):
        obj = orjson.loads(payload)
        if isinstance(obj, dict) and "detail" in obj:
            return str(obj["detail"])
    return payload[:300].decode(errors="replace").strip() or "(no body)"


# --- the coordinator --------------------------------------------------------------------------------
class RackRun:
    """One synchronized run across agents. ``run()`` returns the rack record; ``nodes`` can be
    read while it runs (the demo's view does)."""

    def __init__(self, spec: RackRunSpec, *, on_change: Callable[[RackRun], None] | None = None) -> None:
        self.spec = spec.validate()
        self.nodes = [NodeRun(agent=a) for a in spec.agents]
        self.bundle: Bundle | None = None
        self.on_change = on_change
        self.created_at = time.time()
        self.start_at: float | None = None
        self.lead_time_s: float | None = None
        self.ended_at: float | None = None
        self.interrupted = False
        self.record: JsonDict | None = None
        self._clients: dict[str, AgentClient] = {}

    # --- public ------------------------------------------------------------------------------
    async def run(self) -> JsonDict:
        import aiohttp

        self.bundle = Bundle(self.spec.output_dir)
        self.bundle.write_json(CONFIG_FILE, self._config())
        timeout = aiohttp.ClientTimeout(total=self.spec.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            self._clients = {n.agent: AgentClient(session, n.agent, self.spec.token) for n in self.nodes}
            try:
                await self._probe_all()
                self._assign_keys()
                self._save_rack()
                if not any(n.status == "ready" for n in self.nodes):
                    raise RunError("no agent answered: " + "; ".join(f"{n.agent}: {n.error}" for n in self.nodes))
                await self._start_all()
                self._save_rack()
                await asyncio.gather(*(self._follow(n) for n in self.nodes if n.status in ("pending", "running")))
            except asyncio.CancelledError:
                self.interrupted = True
                await asyncio.shield(self._cancel_remote())
                self._finish()
                raise
            except RackscopeError:
                self._finish()  # the bundle says what went wrong with each node
                raise
            self._finish()
        assert self.record is not None
        return self.record

    # --- phases ------------------------------------------------------------------------------
    async def _probe_all(self) -> None:
        async def probe(n: NodeRun) -> None:
            client = self._clients[n.agent]
            t0 = time.monotonic()
            try:
                identity = await client.json("GET", "/v1/node")
            except RunError as exc:
                n.status, n.error = "unreachable", str(exc)
                return
            n.probe_rtt_s = time.monotonic() - t0
            n.last_seen = time.monotonic()
            n.identity = identity if isinstance(identity, dict) else {}
            n.status = "ready"

        await asyncio.gather(*(probe(n) for n in self.nodes))
        self._changed()

    def _assign_keys(self) -> None:
        used: set[str] = set()
        for i, n in enumerate(self.nodes, start=1):
            base = safe_name(n.node if n.identity else f"agent{i:02d}")
            key, k = base, 2
            while key in used:
                key, k = f"{base}-{k}", k + 1
            used.add(key)
            n.key = key
            if n.identity is not None:
                self._save(n, "node.json", n.identity)

    async def _start_all(self) -> None:
        ready = [n for n in self.nodes if n.status == "ready"]
        slowest = max(n.probe_rtt_s or 0.0 for n in ready)
        lead = self.spec.lead_time_s
        if lead is None:
            lead = max(MIN_LEAD_TIME_S, LEAD_TIME_RTT_FACTOR * slowest + LEAD_TIME_PER_AGENT_S * len(ready))
        self.lead_time_s = lead
        self.start_at = time.time() + lead
        body = {**self.spec.run, "run_id": self.spec.rack_run_id, "start_at": self.start_at}
        log.info(
            "starting run %s on %d agent(s) at %s (lead %.2f s)",
            self.spec.rack_run_id,
            len(ready),
            utc_iso(datetime.fromtimestamp(self.start_at, UTC)),
            lead,
        )

        async def start(n: NodeRun) -> tuple[NodeRun, int | None, str]:
            try:
                status, payload = await self._clients[n.agent].call("POST", "/v1/runs", body)
            except RunError as exc:
                return n, None, str(exc)
            if status == 201:
                view = orjson.loads(payload)
                n.view, n.status, n.last_seen = view, str(view.get("status", "pending")), time.monotonic()
                self._save(n, "run.json", view)
                return n, status, ""
            return n, status, _detail(payload)

        results = await asyncio.gather(*(start(n) for n in ready))
        rejected_config = []
        for n, status, detail in results:
            if status == 201:
                continue
            if status is None:
                n.status, n.error = "unreachable", detail
            else:
                n.status = "rejected"
                n.error = {401: "unauthorized (check --token)", 409: "busy"}.get(status, f"HTTP {status}")
                n.error += f": {detail}"
                if status in (400, 422):
                    rejected_config.append(detail)
        self._changed()
        started = [n for n, status, _ in results if status == 201]
        if not started and rejected_config and len(rejected_config) == len(results):
            raise ConfigError(f"the agents rejected the run config: {rejected_config[0]}")

    async def _follow(self, n: NodeRun) -> None:
        """Poll one node until its run ends (or it is lost), then collect what it produced."""
        client = self._clients[n.agent]
        run_id = self.spec.rack_run_id
        limit = self.spec.deadline_after_start_s()
        assert self.start_at is not None
        deadline = None if limit is None else self.start_at + limit
        record_wait_until: float | None = None
        while True:
            await asyncio.sleep(self.spec.poll_interval_s)
            try:
                view = await client.json("GET", f"/v1/runs/{run_id}")
            except RunError as exc:
                if time.monotonic() - n.last_seen > self.spec.lost_after_s:
                    n.status = "lost"
                    n.error = f"agent stopped answering for {self.spec.lost_after_s:g} s: {exc}"
                    log.warning("node %s lost: %s", n.node, n.error)
                    break
                continue
            n.last_seen = time.monotonic()
            changed = view != n.view
            n.view = view
            status = str(view.get("status"))
            if changed:
                self._save(n, "run.json", view)
                if status != n.status:
                    n.status = status if status not in FINAL_STATUSES else n.status
                    self._changed()
            if status in FINAL_STATUSES:
                # The record is written after the status changes; give it a moment.
                if view.get("record_path") or status != "completed" or view.get("error"):
                    n.status = status
                    n.error = view.get("error") or n.error
                    break
                if record_wait_until is None:
                    record_wait_until = time.monotonic() + RECORD_WAIT_S
                elif time.monotonic() > record_wait_until:
                    n.status = status
                    break
            if deadline is not None and time.time() > deadline:
                n.status = "timeout"
                n.error = f"run still {status} {limit:g} s after the common start; cancelled"
                with contextlib.suppress(RunError):
                    await client.call("POST", f"/v1/runs/{run_id}/cancel")
                break
        await self._collect(n)
        self._changed()
        self._save_rack()

    async def _collect(self, n: NodeRun) -> None:
        """Fetch a finished node's record, request rows and log; each is saved on arrival."""
        assert self.bundle is not None
        client = self._clients[n.agent]
        run_id = self.spec.rack_run_id
        name = safe_name(run_id)
        if n.status not in ("lost", "unreachable"):
            for attempt in range(3):
                try:
                    status, payload = await client.call("GET", f"/v1/runs/{run_id}/record")
                except RunError as exc:
                    self._note(n, f"record not collected: {exc}")
                    break
                if status == 200:
                    try:
                        record = orjson.loads(payload)
                    except orjson.JSONDecodeError:
                        self._note(n, "record not collected: not JSON")
                        break
                    n.record = record if isinstance(record, dict) else None
                    self.bundle.write_bytes(self._rel(n, f"{name}.json"), payload)
                    n.files["record"] = self._rel(n, f"{name}.json")
                    break
                if status == 409 and attempt < 2:
                    await asyncio.sleep(0.5)
                    continue
                if n.status == "completed":
                    self._note(n, f"record not collected: HTTP {status}: {_detail(payload)}")
                break
            if n.record is not None:
                rel = self._rel(n, f"{name}.requests.jsonl")
                try:
                    if await client.download(f"/v1/runs/{run_id}/requests", self.bundle.path(rel)) is not None:
                        n.files["requests"] = rel
                except RackscopeError as exc:
                    self._note(n, f"requests not collected: {exc}")
            if n.status == "completed" and n.record is None:
                n.status = "failed"
        with contextlib.suppress(RunError):
            status, payload = await client.call("GET", "/v1/logs")
            if status == 200:
                self.bundle.write_bytes(self._rel(n, "agent.log"), payload)
                n.files["log"] = self._rel(n, "agent.log")
        if n.record is not None:
            summary = n.record.get("summary")
            if isinstance(summary, dict) and summary.get("complete") is False and n.status == "completed":
                self._note(n, f"run incomplete: {summary.get('stop_reason', 'unknown reason')}")

    async def _cancel_remote(self) -> None:
        """Interrupted: ask every agent still running to stop (best effort, briefly)."""
        active = [n for n in self.nodes if n.status in ("pending", "running")]
        if not active or self.start_at is None:
            return

        async def cancel(n: NodeRun) -> None:
            with contextlib.suppress(RunError):
                await self._clients[n.agent].call("POST", f"/v1/runs/{self.spec.rack_run_id}/cancel")
            n.status, n.error = "cancelled", "rack run interrupted"

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(cancel(n) for n in active)), CANCEL_TIMEOUT_S)

    # --- records ------------------------------------------------------------------------------
    def _note(self, n: NodeRun, message: str) -> None:
        log.warning("node %s: %s", n.node, message)
        n.error = f"{n.error}; {message}" if n.error else message

    def _rel(self, n: NodeRun, name: str) -> str:
        return f"{NODES_DIR}/{n.key or safe_name(n.agent)}/{name}"

    def _save(self, n: NodeRun, name: str, obj: Any) -> None:
        assert self.bundle is not None
        rel = self._rel(n, name)
        self.bundle.write_json(rel, obj)
        n.files[name.split(".", maxsplit=1)[0]] = rel

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _config(self) -> JsonDict:
        return {
            "schema": SCHEMA,
            "rack_run_id": self.spec.rack_run_id,
            "agents": list(self.spec.agents),
            "run": self.spec.run,
            "token": "set" if self.spec.token else None,
            "lead_time_s": self.spec.lead_time_s,
            "poll_interval_s": self.spec.poll_interval_s,
            "lost_after_s": self.spec.lost_after_s,
            "request_timeout_s": self.spec.request_timeout_s,
            "straggler_threshold": self.spec.straggler_threshold,
            "timeout_s": self.spec.timeout_s,
            "created_at": utc_iso(datetime.fromtimestamp(self.created_at, UTC)),
            "rackscope_version": __version__,
        }

    def build_record(self, *, final: bool) -> JsonDict:
        state = "interrupted" if self.interrupted else ("finished" if final else "running")
        return assemble_record(
            self.nodes,
            rack_run_id=self.spec.rack_run_id,
            run=self.spec.run,
            agents=self.spec.agents,
            threshold=self.spec.straggler_threshold,
            bundle_root=self.bundle.root if self.bundle is not None else None,
            state=state,
            created_at=self.created_at,
            start_at=self.start_at,
            lead_time_s=self.lead_time_s,
            ended_at=self.ended_at,
        )

    def _save_rack(self, *, final: bool = False) -> None:
        self.record = self.build_record(final=final)
        if self.bundle is not None:
            self.bundle.write_json(RACK_FILE, self.record)

    def _finish(self) -> None:
        self.ended_at = time.time()
        self._save_rack(final=True)


def assemble_record(
    nodes: Sequence[NodeRun],
    *,
    rack_run_id: str,
    run: Mapping[str, Any],
    agents: Sequence[str],
    threshold: float = DEFAULT_STRAGGLER_THRESHOLD,
    bundle_root: Path | None = None,
    state: str = "finished",
    created_at: float | None = None,
    start_at: float | None = None,
    lead_time_s: float | None = None,
    ended_at: float | None = None,
) -> JsonDict:
    """The ``rackscope.rack/1`` record from what is known of each node. ``state`` is
    ``running`` (written while nodes are still out), ``finished`` or ``interrupted``; only a
    finished record can be complete. With ``bundle_root``, latency distributions are pooled
    from the nodes' per-request files in the bundle."""
    entries = [node_entry(n) for n in nodes]
    summary = summarize_nodes(entries, threshold=threshold)
    if state != "finished":
        summary["complete"] = False
    if state != "running" and bundle_root is not None:
        files = [
            bundle_root / e["files"]["requests"]
            for e in entries
            if e["status"] == "completed" and "requests" in e["files"]
        ]
        try:
            summary.update(pooled_latency(files))
        except ResultError as exc:
            log.warning("latency pooling skipped: %s", exc)
    records = {n.key: n.record for n in nodes if n.record is not None}
    racks = sorted({str(e["rack"]) for e in entries if e["rack"]})
    models = sorted({str(e["gpu_model"]) for e in entries if e["gpu_model"]})

    def iso(t: float | None) -> str | None:
        return None if t is None else utc_iso(datetime.fromtimestamp(t, UTC))

    return {
        "schema": SCHEMA,
        "rack_run_id": rack_run_id,
        "rack": ",".join(racks) or None,
        "state": state,
        "created_at": iso(created_at),
        "start_at": start_at,
        "lead_time_s": lead_time_s,
        "ended_at": iso(ended_at),
        "config": {**run, "agents": list(agents)},
        "environment": {
            "gpu_models": models,
            "simulated": any(bool(e["simulated"]) for e in entries),
            "rackscope_version": __version__,
        },
        "summary": summary,
        "timeseries": rack_timeseries(entries, records),
        "nodes": entries,
    }


def default_output_dir(rack_run_id: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path("results") / f"rack-{stamp}-{rack_run_id}"


def exit_code(record: Mapping[str, Any]) -> int:
    """0 when every node completed, 1 otherwise."""
    return 0 if record.get("summary", {}).get("complete") else 1


__all__ = [
    "SCHEMA",
    "AgentClient",
    "Bundle",
    "NodeRun",
    "RackRun",
    "RackRunSpec",
    "assemble_record",
    "default_output_dir",
    "exit_code",
    "node_entry",
    "normalize_agent_url",
    "parse_agents",
    "pooled_latency",
    "rack_timeseries",
    "summarize_nodes",
]
