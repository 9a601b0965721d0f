"""What run and rack records hold for a comparison: per window, its summary, 1 s buckets and finished requests.

A window's buckets and requests come in streams: one for a run record, one per node for a
rack record (taken from the node records in its bundle)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rackscope.errors import ResultError
from rackscope.jsontypes import JsonDict
from rackscope.runner.results.io import check_schema, load_json, load_requests, rows_file, verify_rows
from rackscope.runner.verdict import Buckets

FAMILIES = ("rackscope.run", "rackscope.rack")
RUN_FAMILY, RACK_FAMILY = FAMILIES
COMPLETED = "completed"  # a rack record's node status whose run counts towards the rack


@dataclass(frozen=True, slots=True)
class Window:
    """One measured window of one record: its summary, its 1 s buckets and its finished
    requests, each as streams (one per node: a run record has one, a rack record one per
    node). ``buckets`` or ``rows`` is empty when the record does not carry them."""

    summary: Mapping[str, Any]
    buckets: list[Buckets] = field(default_factory=list)
    rows: list[list[JsonDict]] = field(default_factory=list)
    # A sweep's whole run strings different load levels together: no single level's noise
    # describes it, so its points are judged instead.
    sweep: bool = False

    def values(self, key: str) -> list[list[float]]:
        """Per stream, the numbers a row field holds for finished requests, in issue order."""
        return [[float(r[key]) for r in stream if _number(r.get(key))] for stream in self.rows]


@dataclass(frozen=True, slots=True)
class Measured:
    """A record ready to compare: its whole window, its sweep points and (rack records) its nodes."""

    path: Path
    kind: Literal["run", "rack"]
    whole: Window
    points: dict[str, Window] = field(default_factory=dict)
    nodes: dict[str, Window] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any) -> float | None:
    """A finite JSON number as a float, else ``None``."""
    return float(value) if _number(value) else None


def load_comparable(path: str | Path) -> JsonDict:
    """A run or rack record with a summary object; ``ResultError`` otherwise. A run record
    whose rows file does not match it is refused."""
    obj = load_json(path)
    check_schema(path, obj, FAMILIES)
    if not isinstance(obj.get("summary"), Mapping):
        raise ResultError(f"{path}: 'summary' missing or not an object")
    verify_rows(path, obj)
    return obj


def buckets(series: Any, summary: Mapping[str, Any]) -> Buckets | None:
    """A record's ``timeseries`` as buckets, scaled so that their rate and tokens per joule are
    exactly the summary's (the series spreads each request's tokens evenly, which the summary's
    exact counts correct); ``None`` when there is no usable series."""
    if not isinstance(series, Mapping):
        return None
    rates, starts = series.get("output_tokens_per_s"), series.get("t_s")
    width = series.get("bucket_s", 1.0)
    if not (isinstance(rates, list) and isinstance(starts, list) and rates and len(rates) == len(starts)
            and all(_number(v) for v in rates) and all(_number(t) for t in starts) and _number(width) and width > 0):
        return None
    seconds = [float(width)] * len(rates)
    duration = _num(summary.get("duration_s"))
    if duration is not None and 0 < duration - starts[-1] < width:
        seconds[-1] = duration - starts[-1]  # the last bucket may be shorter
    tokens = [max(0.0, float(r)) * s for r, s in zip(rates, seconds, strict=True)]
    total_s, total_tok = math.fsum(seconds), math.fsum(tokens)
    want = _num(summary.get("output_tokens_per_s"))
    if want is not None and total_tok > 0:
        tokens = [t * want * total_s / total_tok for t in tokens]
        total_tok = want * total_s
    power = series.get("power_w")
    energy: list[float] | None = None
    if isinstance(power, list) and len(power) == len(rates) and all(_number(p) for p in power):
        energy = [max(0.0, float(p)) * s for p, s in zip(power, seconds, strict=True)]
        tpj, total_j = _num(summary.get("output_tokens_per_j")), math.fsum(energy)
        if tpj is not None and tpj > 0 and total_j > 0:
            energy = [e * (total_tok / tpj) / total_j for e in energy]
    return Buckets(tokens, seconds, energy)


def _finished(rows: Sequence[JsonDict]) -> list[JsonDict]:
    ok = [r for r in rows if r.get("ok") is True]
    return sorted(ok, key=lambda r: r["start_s"] if _number(r.get("start_s")) else 0.0)


def _read_rows(path: Path, record: Mapping[str, Any]) -> list[JsonDict] | None:
    rows = rows_file(path, record)
    if rows is None or not rows.exists():
        return None
    return list(load_requests(rows))


def _point_label(point: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, int | float) else f"{k}={v}" for k, v in point.items())


def run_windows(path: Path, record: Mapping[str, Any]) -> tuple[Window, dict[str, Window]]:
    """The whole window and the sweep points' windows of a run record."""
    summary = record["summary"]
    rows = _read_rows(path, record)
    whole_buckets = buckets(record.get("timeseries"), summary)
    whole = Window(summary, [whole_buckets] if whole_buckets else [], [_finished(rows)] if rows is not None else [])
    points: dict[str, Window] = {}
    for index, p in enumerate(record.get("points") or []):
        if not (isinstance(p, Mapping) and isinstance(p.get("summary"), Mapping)
                and isinstance(p.get("point"), Mapping)):
            continue
        b = buckets(p.get("timeseries"), p["summary"])
        mine = [_finished([r for r in rows if r.get("point") == index])] if rows is not None else []
        points[_point_label(p["point"])] = Window(p["summary"], [b] if b else [], mine)
    if points:
        whole = Window(summary, sweep=True)
    return whole, points


def _inside(bundle: Path, rel: Any) -> Path | None:
    """A path a rack record names inside its bundle; ``None`` for one that leaves the bundle."""
    if not isinstance(rel, str) or not rel:
        return None
    root = bundle.resolve()
    path = (root / rel).resolve()
    return path if path.is_relative_to(root) else None


def rack_windows(path: Path, record: Mapping[str, Any]) -> tuple[Window, dict[str, Window], list[str]]:
    """The whole window of a rack record (its completed nodes' records as streams) and each
    completed node's window, with notes on what could not be used. Without every completed
    node's record the whole window falls back to the rack's summed series and summary alone."""
    nodes: dict[str, Window] = {}
    notes: list[str] = []
    missing = False
    for entry in record.get("nodes") or []:
        if not isinstance(entry, Mapping) or entry.get("status") != COMPLETED:
            continue
        name = str(entry.get("node") or entry.get("key") or "?")
        files = entry.get("files")
        node_path = _inside(path.parent, files.get("record") if isinstance(files, Mapping) else None)
        if node_path is None or not node_path.is_file():
            notes.append(f"{path}: node {name}: its run record is not in the bundle")
            missing = True
            continue
        node_record = load_comparable(node_path)
        check_schema(node_path, node_record, (RUN_FAMILY,))
        nodes[name], _ = run_windows(node_path, node_record)
    summary = record["summary"]
    if nodes and not missing:
        whole = Window(
            summary,
            [b for w in nodes.values() for b in w.buckets] if all(w.buckets for w in nodes.values()) else [],
            [s for w in nodes.values() for s in w.rows] if all(w.rows for w in nodes.values()) else [],
        )
    else:
        b = buckets(record.get("timeseries"), summary)
        whole = Window(summary, [b] if b else [])
    return whole, nodes, notes


def measure(path: str | Path) -> Measured:
    """Load a run or rack record (and, for a rack, its nodes' records) for comparison."""
    path = Path(path)
    record = load_comparable(path)
    family = str(record["schema"]).partition("/")[0]
    if family == RACK_FAMILY:
        whole, nodes, notes = rack_windows(path, record)
        return Measured(path, "rack", whole, nodes=nodes, notes=notes)
    whole, points = run_windows(path, record)
    return Measured(path, "run", whole, points=points)
