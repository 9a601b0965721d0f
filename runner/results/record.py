"""The ``rackscope.run/1`` record: its schema constants, ``RunResult`` (what a run measured)
and how it becomes a record and per-request rows (see docs/results-schema.md)."""

from __future__ import annotations

import functools
import math
import platform
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rackscope import __version__
from rackscope.errors import ResultError
from rackscope.jsontypes import JsonDict
from rackscope.runner.records import RequestRecord
from rackscope.runner.results.series import timeseries
from rackscope.runner.results.window import Limits, Phase, gpu_totals, summarize

SCHEMA = "rackscope.run/1"
LATENCY_KEYS = ("ttft_s", "itl_s", "tpot_s", "e2e_s")
# Summary keys a record must carry for the loader to accept it.
REQUIRED_SUMMARY_KEYS = (
    "complete", "requests_completed", "requests_failed", "input_tokens", "output_tokens", "duration_s",
    "output_tokens_per_s", "energy_j", "output_tokens_per_j", *LATENCY_KEYS,
)
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class RowsDigest:
    """What a record knows of its per-request rows file, so a reader can tell the rows of
    this run from another run's: how many rows, how many bytes, and their SHA-256."""

    rows: int
    size_bytes: int
    sha256: str

    def to_json(self) -> JsonDict:
        return {"rows": self.rows, "bytes": self.size_bytes, "sha256": self.sha256}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: object) -> RowsDigest | None:
        """The record's ``requests_digest``; ``None`` for records written before it existed."""
        value = record.get("requests_digest")
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ResultError(f"{where}: 'requests_digest' must be an object")
        rows, size, sha = value.get("rows"), value.get("bytes"), value.get("sha256")
        if not (isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0):
            raise ResultError(f"{where}: requests_digest.rows must be a count")
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            raise ResultError(f"{where}: requests_digest.bytes must be a count")
        if not (isinstance(sha, str) and _SHA256_HEX.match(sha)):
            raise ResultError(f"{where}: requests_digest.sha256 must be 64 lower-case hex digits")
        return cls(rows, size, sha)


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def environment(
    *,
    engine: str,
    model: str,
    gpu_models: Sequence[str],
    records: Iterable[RequestRecord],
    extra: Mapping[str, Any] | None = None,
) -> JsonDict:
    """Where a run ran: engine, model, GPUs, versions and how output tokens were counted."""
    methods = sorted({r.output_tokens_method for r in records if r.ok})
    env: JsonDict = {
        "engine": engine,
        "model": model,
        "gpu_models": list(gpu_models),
        "output_tokens_method": methods[0] if len(methods) == 1 else ("mixed" if methods else None),
        "output_tokens_methods": methods,
        "rackscope_version": __version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }
    if extra:
        env.update(extra)
    return env


@dataclass
class RunResult:
    """What ``run_scenario`` returns: the measured phases plus identity and outcome."""

    run_id: str
    config: JsonDict
    environment: JsonDict
    started_at: datetime
    ended_at: datetime
    phases: list[Phase]
    node: str
    gpus: int | None
    limits: Limits | None = None
    sweep: bool = False
    error: str | None = None
    # The server's own view of the run (runner.server_view), for runs that read its metrics page.
    server: JsonDict | None = None

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.phases) and self.error is None

    @property
    def records(self) -> list[RequestRecord]:
        return [r for p in self.phases for r in p.records]

    def whole(self) -> Phase:
        """All phases as one window (the run's headline summary)."""
        if len(self.phases) == 1:
            return self.phases[0]
        first, last = self.phases[0], self.phases[-1]
        samples = [s for p in self.phases for s in p.energy_samples]
        stop = next((p.stop_reason for p in self.phases if not p.complete), last.stop_reason)
        return Phase(
            self.records, first.start_s, last.end_s, first.energy_start, last.energy_end, samples,
            target_rate_per_s=None, complete=self.complete, stop_reason=stop,
            carried=[c for p in self.phases for c in p.carried],
        )

    @functools.cached_property
    def point_summaries(self) -> list[JsonDict]:
        """Each sweep point's own summary (empty for a run that is not a sweep)."""
        return [summarize(p, gpus=self.gpus, limits=self.limits) for p in self.phases] if self.sweep else []

    @functools.cached_property
    def summary(self) -> JsonDict:
        """The headline summary: of the whole run, or for a sweep of its chosen point (see
        ``sweep_headline``): rates and percentiles over several load levels mix them into a
        figure no single level produced."""
        whole = self.whole()
        if self.sweep and self.phases:
            summary = sweep_headline(
                [p.point or {} for p in self.phases], self.point_summaries, limited=self.limits is not None,
            )
            summary["stop_reason"] = whole.stop_reason
        else:
            summary = summarize(whole, gpus=self.gpus, limits=self.limits)
        summary["complete"] = self.complete
        return summary

    def to_record(self, requests_file: str | None = None, requests_digest: RowsDigest | None = None) -> JsonDict:
        """The record; ``requests_file`` and ``requests_digest`` name the rows written beside it."""
        whole = self.whole()
        per_gpu, per_node = gpu_totals(whole, node=self.node)
        points = []
        if self.sweep:
            for index, p in enumerate(self.phases):
                p_gpu, p_node = gpu_totals(p, node=self.node)
                points.append({
                    "point": p.point,
                    "summary": self.point_summaries[index],
                    "per_gpu": p_gpu,
                    "per_node": p_node,
                    "timeseries": timeseries(p),
                })
        return {
            "schema": SCHEMA,
            "run_id": self.run_id,
            "started_at": utc_iso(self.started_at),
            "ended_at": utc_iso(self.ended_at),
            "error": self.error,
            "config": self.config,
            "environment": self.environment,
            "summary": self.summary,
            "per_gpu": per_gpu,
            "per_node": per_node,
            "timeseries": timeseries(whole),
            "points": points,
            "server": self.server,
            "requests_file": requests_file,
            "requests_digest": requests_digest.to_json() if requests_digest is not None else None,
        }

    def request_rows(self) -> Iterator[JsonDict]:
        """One JSONL row per measured request; times relative to the run's first window."""
        origin = self.phases[0].start_s if self.phases else 0.0
        for index, phase in enumerate(self.phases):
            for r in phase.records:
                yield request_row(r, origin, index if self.sweep else None)


def sweep_headline(points: Sequence[JsonDict], summaries: Sequence[JsonDict], *, limited: bool) -> JsonDict:
    """A sweep's top-level summary: a copy of one point's summary, named in ``sweep``, with
    totals that are sums over every point.

    The chosen point is the highest output tokens/s among points that meet the limits
    (``meets_limits``); with limits that no point meets, or without limits, the highest output
    tokens/s among complete points (``no_point_meets_limits``, ``no_limits``)."""
    indexed = list(enumerate(summaries))
    valid = [(i, s) for i, s in indexed if s.get("valid") is True] if limited else []
    complete = [(i, s) for i, s in indexed if s.get("complete")] or indexed
    pool, chosen_by = (valid, "meets_limits") if valid else (
        complete, "no_point_meets_limits" if limited else "no_limits")
    index, best = max(pool, key=lambda item: (item[1].get("output_tokens_per_s") or 0.0, -item[0]))
    energies = [s.get("energy_j") for s in summaries]
    summary = dict(best)
    summary["sweep"] = {
        "points": len(summaries),
        "point_index": index,
        "point": dict(points[index]),
        "chosen_by": chosen_by,
        # Sums only: a count or an amount adds up across load levels, a rate does not.
        "totals": {
            "requests_completed": sum(int(s.get("requests_completed") or 0) for s in summaries),
            "requests_failed": sum(int(s.get("requests_failed") or 0) for s in summaries),
            "input_tokens": sum(int(s.get("input_tokens") or 0) for s in summaries),
            "output_tokens": sum(int(s.get("output_tokens") or 0) for s in summaries),
            "duration_s": math.fsum(float(s.get("duration_s") or 0.0) for s in summaries),
            "energy_j": None if any(e is None for e in energies)
            else math.fsum(float(e) for e in energies if e is not None),
        },
    }
    return summary


def request_row(r: RequestRecord, origin_s: float, point: int | None = None) -> JsonDict:
    row: JsonDict = {
        "request_id": r.request_id,
        "start_s": r.start_s - origin_s,
        "ttft_s": r.ttft_s,
        "tpot_s": r.tpot_s,
        "e2e_s": r.e2e_s,
        "itl_mean_s": math.fsum(r.itl_s) / len(r.itl_s) if r.itl_s else None,
        "itl_max_s": max(r.itl_s) if r.itl_s else None,
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "output_tokens_method": r.output_tokens_method,
        "ok": r.ok,
        "error_type": r.error_type,
        "error": r.error,
        "gpu": r.gpu,
    }
    if point is not None:
        row["point"] = point
    return row


def now_utc() -> datetime:
    return datetime.now(UTC)
