"""Rack run settings: the agents, the run sent to each, and the deadlines and size caps.

Every default a rack run has is declared here, including the bounds on each exchange with an
agent (rack/client.py applies them)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from rackscope.contract import IDENTIFIER_PATTERN
from rackscope.errors import ConfigError
from rackscope.jsontypes import JsonDict
from rackscope.runner.config import IDENTIFIER_RULE
from rackscope.urls import redact_url

MIB = 1024 * 1024

DEFAULT_STRAGGLER_THRESHOLD = 0.95  # a node below 95 % of the median node is a straggler
DEFAULT_POLL_INTERVAL_S = 0.5
DEFAULT_LOST_AFTER_S = 10.0  # an agent unreachable this long mid-run is marked lost
# Every control call (probe, start, poll, cancel, log) must finish, body and all, within this.
DEFAULT_CALL_TIMEOUT_S = 10.0
# Fetching a finished node's record, and separately its per-request rows, may take this long:
# a long run's rows are large, and the agent builds both on demand.
DEFAULT_COLLECT_TIMEOUT_S = 120.0
# On an interrupt or an error, the agents' answers to the cancel are awaited this long in all.
DEFAULT_CANCEL_TIMEOUT_S = 3.0
FINISH_GRACE_S = 60.0  # a timed run may overrun its duration by this much (+50 %) before it is given up
MAX_DEADLINE_S = 24 * 3600.0

# The run id names the run on every agent and its files in the bundle: the agents' own rule.
_RUN_ID = re.compile(IDENTIFIER_PATTERN)


@dataclass(frozen=True)
class AnswerCaps:
    """The most bytes accepted from an agent for each kind of answer, counted after
    decompression. An answer over its cap fails that node's call; nothing larger is buffered."""

    answer_bytes: int = 1 * MIB  # identity, run views, cancel answers, error bodies
    record_bytes: int = 64 * MIB  # a run record (a day-long run's time series is a few MiB)
    requests_bytes: int = 2048 * MIB  # per-request rows, streamed to disk (millions of rows)
    log_bytes: int = 8 * MIB  # the agent keeps its last 2,000 log lines

    def validate(self) -> AnswerCaps:
        for name in ("answer_bytes", "record_bytes", "requests_bytes", "log_bytes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"answer cap {name} must be positive")
        return self


def normalize_agent_url(text: str) -> str:
    """``host:port`` or ``http(s)://host:port[/prefix]`` -> a base URL without trailing slash."""
    raw = text.strip()
    if not raw:
        raise ConfigError("empty agent URL")
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    shown = redact_url(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"bad agent URL {shown!r}: expected http://HOST:PORT")
    try:
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError:
        raise ConfigError(f"bad port in agent URL {shown!r}") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"agent URL {shown!r} must not carry a query or fragment")
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
    duplicates = sorted({redact_url(a) for a in agents if agents.count(a) > 1})
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
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    collect_timeout_s: float = DEFAULT_COLLECT_TIMEOUT_S
    cancel_timeout_s: float = DEFAULT_CANCEL_TIMEOUT_S
    straggler_threshold: float = DEFAULT_STRAGGLER_THRESHOLD
    timeout_s: float | None = None  # None: duration + 50 % + FINISH_GRACE_S for timed runs, else none
    caps: AnswerCaps = field(default_factory=AnswerCaps)

    def validate(self) -> RackRunSpec:
        if not self.agents:
            raise ConfigError("a rack run needs at least one agent")
        if not 0.0 < self.straggler_threshold <= 1.0:
            raise ConfigError(f"--straggler-threshold must be in (0, 1], not {self.straggler_threshold}")
        if self.lead_time_s is not None and not 0.0 <= self.lead_time_s <= 3600.0:
            raise ConfigError(f"--lead-time must be 0-3600 seconds, not {self.lead_time_s}")
        for name in ("poll_interval_s", "lost_after_s", "call_timeout_s", "collect_timeout_s", "cancel_timeout_s"):
            value = getattr(self, name)
            if not 0.0 < value <= MAX_DEADLINE_S:
                raise ConfigError(f"{name} must be positive and at most a day, not {value}")
        if self.timeout_s is not None and not self.timeout_s > 0.0:
            raise ConfigError(f"--timeout must be positive, not {self.timeout_s}")
        if not _RUN_ID.fullmatch(self.rack_run_id):
            raise ConfigError(f"run id {self.rack_run_id!r}: use {IDENTIFIER_RULE}")
        self.caps.validate()
        return self

    def deadline_after_start_s(self) -> float | None:
        if self.timeout_s is not None:
            return self.timeout_s
        duration = self.run.get("duration_s")
        if isinstance(duration, int | float) and duration > 0:
            return float(duration) * 1.5 + FINISH_GRACE_S
        return None


def default_output_dir(rack_run_id: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path("results") / f"rack-{stamp}-{rack_run_id}"


__all__ = [
    "DEFAULT_CALL_TIMEOUT_S",
    "DEFAULT_CANCEL_TIMEOUT_S",
    "DEFAULT_COLLECT_TIMEOUT_S",
    "DEFAULT_LOST_AFTER_S",
    "DEFAULT_POLL_INTERVAL_S",
    "DEFAULT_STRAGGLER_THRESHOLD",
    "AnswerCaps",
    "RackRunSpec",
    "default_output_dir",
    "normalize_agent_url",
    "parse_agents",
]
