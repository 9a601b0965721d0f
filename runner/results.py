"""Run records: statistics over request records, the ``rackscope.run/1`` JSON record, its
per-request JSONL, atomic writing and a validating loader (see docs/results-schema.md)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import platform
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from rackscope import __version__
from rackscope.errors import ResultError
from rackscope.runner.jsonl import read_objects
from rackscope.runner.records import RequestRecord

SCHEMA = "rackscope.run/1"
REQUESTS_SUFFIX = ".requests.jsonl"
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0), ("p999", 99.9),
)
LATENCY_KEYS = ("ttft_s", "itl_s", "tpot_s", "e2e_s")
BUCKET_S = 1.0
CANCELLED = "cancelled"  # error_type of a request the runner stopped (deadline or cancel)

# Summary keys a record must carry for the loader to accept it.
REQUIRED_SUMMARY_KEYS = (
    "complete", "requests_completed", "requests_failed", "input_tokens", "output_tokens", "duration_s",
    "output_tokens_per_s", "energy_j", "output_tokens_per_j", *LATENCY_KEYS,
)

JsonDict = dict[str, Any]


# --- statistics -------------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ascending values, interpolating linearly between the
    two nearest ranks (numpy's default method), so small samples give exact, stable values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def distribution(values: Iterable[float]) -> JsonDict:
    """count, mean, min, max and the report percentiles; all ``None`` (count 0) when empty."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "mean": None, "min": None, "max": None, **{name: None for name, _ in PERCENTILES}}
    return {
        "count": len(ordered),
        "mean": math.fsum(ordered) / len(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        **{name: percentile(ordered, q) for name, q in PERCENTILES},
    }


def _ratio(num: float, den: float | None) -> float | None:
    return num / den if den else None


# --- what a scenario hands over -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Limits:
    """Server-scenario latency limits, checked at p99 as MLPerf does."""

    ttft_s: float
    tpot_s: float


@dataclass
class Phase:
    """One measured window: the whole run, or one point of a sweep. Times are on the
    engine's clock; energy readings are cumulative joules per GPU key (``"n01/0"``)."""

    records: list[RequestRecord]
    start_s: float
    end_s: float
    energy_start: Mapping[str, float] | None = None
    energy_end: Mapping[str, float] | None = None
    energy_samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    point: dict[str, float] | None = None  # the sweep parameter, e.g. {"concurrency": 8}
    target_rate_per_s: float | None = None
    complete: bool = True
    stop_reason: str = "requests"
    # Requests issued before the window (warm-up) that were still in flight when it opened,
    # with the output tokens they had by then (None when the engine could not say). Only
    # what they produced inside the window counts, and only towards throughput.
    carried: list[tuple[RequestRecord, int | None]] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end_s - self.start_s)


def counted(rec: RequestRecord) -> bool:
    """Requests whose output counts towards throughput: finished ones, and ones the runner
    stopped at the deadline (their tokens arrived inside the window)."""
    return rec.ok or rec.error_type == CANCELLED


def tokens_between(rec: RequestRecord, start_s: float, end_s: float) -> float:
    """Output tokens of ``rec`` that arrived within [start_s, end_s]: exact from its token
    gaps when it has them, else its first token plus the rest spread evenly up to its end."""
    first = rec.first_token_s
    if first is None or rec.output_tokens <= 0:
        return 0.0
    last = rec.end_s if rec.end_s is not None else first
    if rec.itl_s is not None and len(rec.itl_s) == rec.output_tokens - 1:
        t = first
        n = 1.0 if start_s <= t <= end_s else 0.0
        for gap in rec.itl_s:
            t += gap
            if start_s <= t <= end_s:
                n += 1.0
        return n
    n = 1.0 if start_s <= first <= end_s else 0.0
    rest = rec.output_tokens - 1
    if rest > 0:
        if last <= first:
            n += rest if start_s <= first <= end_s else 0.0
        else:
            overlap = max(0.0, min(end_s, last) - max(start_s, first))
            n += rest * overlap / (last - first)
    return n


def contributions(phase: Phase) -> Iterator[tuple[RequestRecord, int, float]]:
    """(record, input tokens, output tokens) each request adds to the window's throughput."""
    for r in phase.records:
        if counted(r):
            yield r, (r.input_tokens if r.first_token_s is not None else 0), float(r.output_tokens)
    for r, before in phase.carried:
        if not counted(r):
            continue
        n_in = r.input_tokens if r.first_token_s is not None and r.first_token_s >= phase.start_s else 0
        if before is not None:
            out = float(max(0, r.output_tokens - before))
        else:
            out = tokens_between(r, phase.start_s, phase.end_s)
        yield r, n_in, out


def _energy_by_gpu(phase: Phase) -> dict[str, float]:
    if phase.energy_start is None or phase.energy_end is None:
        return {}
    return {
        key: max(0.0, phase.energy_end[key] - phase.energy_start[key])
        for key in phase.energy_end
        if key in phase.energy_start
    }


def summarize(phase: Phase, *, gpus: int | None, limits: Limits | None = None) -> JsonDict:
    """The ``summary`` object of a run record (see docs/results-schema.md)."""
    records = phase.records
    ok = [r for r in records if r.ok]
    cancelled = [r for r in records if r.error_type == CANCELLED and not r.ok]
    failed = [r for r in records if not r.ok and r.error_type != CANCELLED]
    duration_s = phase.duration_s
    input_tokens = 0
    output_f = 0.0
    for _, n_in, n_out in contributions(phase):
        input_tokens += n_in
        output_f += n_out
    output_tokens = round(output_f)
    energy = _energy_by_gpu(phase)
    energy_j = math.fsum(energy.values()) if energy else None
    out_per_s = output_tokens / duration_s if duration_s > 0 else 0.0

    itl_values: list[float] = []
    with_gaps = without_gaps = 0
    for r in ok:
        if r.itl_s is not None:
            itl_values.extend(r.itl_s)
            with_gaps += 1
        elif (tpot := r.tpot_s) is not None:
            itl_values.append(tpot)
            without_gaps += 1
    itl_method = "token_gaps" if without_gaps == 0 and with_gaps else "tpot" if with_gaps == 0 else "mixed"

    summary: JsonDict = {
        "complete": phase.complete,
        "stop_reason": phase.stop_reason,
        "requests_issued": len(records),
        "requests_completed": len(ok),
        "requests_failed": len(failed),
        "requests_failed_by_error": dict(sorted(Counter(r.error_type or "unknown" for r in failed).items())),
        "requests_cancelled": len(cancelled),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "duration_s": duration_s,
        "requests_per_s": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_tokens_per_s": out_per_s,
        "total_tokens_per_s": (input_tokens + output_tokens) / duration_s if duration_s > 0 else 0.0,
        "gpus": gpus,
        "output_tokens_per_s_per_gpu": out_per_s / gpus if gpus else None,
        "energy_j": energy_j,
        "average_power_w": energy_j / duration_s if energy_j is not None and duration_s > 0 else None,
        "output_tokens_per_j": _ratio(output_tokens, energy_j),
        "ttft_s": distribution(t for r in ok if (t := r.ttft_s) is not None),
        "itl_s": distribution(itl_values),
        "itl_method": itl_method,
        "tpot_s": distribution(t for r in ok if (t := r.tpot_s) is not None),
        "e2e_s": distribution(t for r in ok if (t := r.e2e_s) is not None),
    }
    if limits is not None:
        summary.update(server_validity(phase, summary, limits))
    return summary


def meets_limits(rec: RequestRecord, limits: Limits) -> bool:
    """A finished request within both limits (a one-token answer has no TPOT to miss)."""
    ttft, tpot = rec.ttft_s, rec.tpot_s
    return rec.ok and ttft is not None and ttft <= limits.ttft_s and (tpot is None or tpot <= limits.tpot_s)


def server_validity(phase: Phase, summary: Mapping[str, Any], limits: Limits) -> JsonDict:
    """Goodput and MLPerf-style validity: p99 TTFT and p99 TPOT within the limits."""
    good = sum(1 for r in phase.records if meets_limits(r, limits))
    reasons: list[str] = []
    p99_ttft = summary["ttft_s"]["p99"]
    p99_tpot = summary["tpot_s"]["p99"]
    if p99_ttft is None:
        reasons.append("no request finished")
    elif p99_ttft > limits.ttft_s:
        reasons.append(f"p99 TTFT {p99_ttft * 1e3:.1f} ms > limit {limits.ttft_s * 1e3:.1f} ms")
    if p99_tpot is not None and p99_tpot > limits.tpot_s:
        reasons.append(f"p99 TPOT {p99_tpot * 1e3:.1f} ms > limit {limits.tpot_s * 1e3:.1f} ms")
    if not phase.complete:
        reasons.append("run incomplete")
    duration_s = phase.duration_s
    completed = summary["requests_completed"]
    return {
        "ttft_limit_s": limits.ttft_s,
        "tpot_limit_s": limits.tpot_s,
        "target_rate_per_s": phase.target_rate_per_s,
        "goodput_requests_per_s": good / duration_s if duration_s > 0 else 0.0,
        "goodput_fraction": good / completed if completed else 0.0,
        "valid": not reasons,
        "validity": "INVALID" if reasons else "VALID",
        "validity_reasons": reasons,
    }


# --- per-GPU and per-node totals ------------------------------------------------------------
def split_gpu_key(key: str) -> tuple[str, str]:
    node, _, gpu = key.rpartition("/")
    return node, gpu


def gpu_totals(phase: Phase, *, node: str) -> tuple[list[JsonDict], list[JsonDict]]:
    """Tokens, energy and tokens/J per GPU key and per node. A request counts against the
    GPU the engine said served it; requests without one count only on their node."""
    duration_s = phase.duration_s
    energy = _energy_by_gpu(phase)
    tokens: dict[str, list[float]] = {}  # key -> [input, output, requests]
    node_tokens: dict[str, list[float]] = {}
    measured = {id(r) for r in phase.records}
    for r, n_in, n_out in contributions(phase):
        for bucket in (node_tokens.setdefault(node, [0.0, 0.0, 0.0]),) + (
            (tokens.setdefault(f"{node}/{r.gpu}", [0.0, 0.0, 0.0]),) if r.gpu is not None else ()
        ):
            bucket[0] += n_in
            bucket[1] += n_out
            bucket[2] += 1 if r.ok and id(r) in measured else 0
    attributed = any(r.gpu is not None for r in phase.records)

    def row(name_key: str, name: str, t: list[float] | None, energy_j: float | None) -> JsonDict:
        out = round(t[1]) if t else 0
        return {
            name_key: name,
            "input_tokens": round(t[0]) if t else 0,
            "output_tokens": out,
            "requests_completed": round(t[2]) if t else 0,
            "output_tokens_per_s": out / duration_s if duration_s > 0 else 0.0,
            "energy_j": energy_j,
            "average_power_w": energy_j / duration_s if energy_j is not None and duration_s > 0 else None,
            "output_tokens_per_j": _ratio(out, energy_j),
        }

    per_gpu = []
    for key in sorted(set(energy) | set(tokens), key=_gpu_sort_key):
        entry = row("gpu", key, tokens.get(key, [0.0, 0.0, 0.0]) if attributed else None, energy.get(key))
        node_name, index = split_gpu_key(key)
        entry["node"], entry["index"] = node_name, int(index) if index.isdigit() else index
        entry["tokens_attributed"] = attributed
        per_gpu.append(entry)
    node_energy: dict[str, float] = {}
    for key, joules in energy.items():
        n = split_gpu_key(key)[0] or node
        node_energy[n] = node_energy.get(n, 0.0) + joules
    per_node = [
        row("node", n, node_tokens.get(n), node_energy.get(n))
        for n in sorted(set(node_tokens) | set(node_energy))
    ]
    return per_gpu, per_node


def _gpu_sort_key(key: str) -> tuple[str, int, str]:
    node, gpu = split_gpu_key(key)
    return (node, int(gpu) if gpu.isdigit() else -1, gpu)


# --- throughput time series -------------------------------------------------------------------
def _spread(buckets: list[float], start_s: float, a: float, b: float, amount: float) -> None:
    """Add ``amount`` spread evenly over [a, b] (seconds from the window start) to buckets."""
    n = len(buckets)
    if b <= a:
        i = min(n - 1, max(0, int((a - start_s) // BUCKET_S)))
        buckets[i] += amount
        return
    rate = amount / (b - a)
    first = max(0, int((a - start_s) // BUCKET_S))
    last = min(n - 1, int((b - start_s) // BUCKET_S))
    for i in range(first, last + 1):
        lo = max(a, start_s + i * BUCKET_S)
        hi = min(b, start_s + (i + 1) * BUCKET_S)
        if hi > lo:
            buckets[i] += rate * (hi - lo)


def _interp(samples: Sequence[tuple[float, float]], t: float) -> float:
    if t <= samples[0][0]:
        return samples[0][1]
    for (t0, v0), (t1, v1) in itertools.pairwise(samples):
        if t <= t1:
            return v0 + (v1 - v0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return samples[-1][1]


def timeseries(phase: Phase) -> JsonDict:
    """1 s buckets from the window start: output tokens/s (each request's tokens spread
    evenly from its first token to its end), requests finished, failures, and power when
    energy was sampled."""
    n = max(1, math.ceil(phase.duration_s / BUCKET_S - 1e-9))
    tokens = [0.0] * n
    done = [0] * n
    errors = [0] * n
    start = phase.start_s
    for r in phase.records:
        if r.end_s is not None:
            i = min(n - 1, max(0, int((r.end_s - start) // BUCKET_S)))
            if r.ok:
                done[i] += 1
            elif r.error_type != CANCELLED:
                errors[i] += 1
    for r in [*phase.records, *(c for c, _ in phase.carried)]:
        if not counted(r) or r.first_token_s is None or r.output_tokens <= 0:
            continue
        end = r.end_s if r.end_s is not None else r.first_token_s
        if start <= r.first_token_s <= phase.end_s:
            _spread(tokens, start, r.first_token_s, r.first_token_s, 1.0)
        if r.output_tokens > 1:
            # Only the part inside the window: a carried request began before it.
            a, b = max(r.first_token_s, start), min(end, phase.end_s)
            if b > a or (b == a and end == r.first_token_s):
                share = (b - a) / (end - r.first_token_s) if end > r.first_token_s else 1.0
                _spread(tokens, start, a, b, float(r.output_tokens - 1) * share)
    widths = [min(BUCKET_S, phase.duration_s - i * BUCKET_S) if phase.duration_s > 0 else BUCKET_S for i in range(n)]
    series: JsonDict = {
        "bucket_s": BUCKET_S,
        "t_s": [i * BUCKET_S for i in range(n)],
        "output_tokens_per_s": [tok / w if w > 0 else 0.0 for tok, w in zip(tokens, widths, strict=True)],
        "requests_completed": done,
        "requests_failed": errors,
        "power_w": None,
    }
    samples = sorted(phase.energy_samples)
    if phase.energy_start is not None:
        samples.insert(0, (phase.start_s, dict(phase.energy_start)))
    if phase.energy_end is not None:
        samples.append((phase.end_s, dict(phase.energy_end)))
    if len(samples) >= 2:
        keys = set(samples[0][1]).intersection(*(s[1] for s in samples))
        totals = [(t, math.fsum(v[k] for k in keys)) for t, v in samples]
        power = []
        for i, w in enumerate(widths):
            a = start + i * BUCKET_S
            power.append((_interp(totals, a + w) - _interp(totals, a)) / w if w > 0 else 0.0)
        series["power_w"] = power
    return series


# --- the record ------------------------------------------------------------------------------
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
    def summary(self) -> JsonDict:
        """The headline summary (of the whole run; a sweep's points have their own)."""
        whole = self.whole()
        summary = summarize(whole, gpus=self.gpus, limits=None if self.sweep else self.limits)
        summary["complete"] = self.complete
        return summary

    def to_record(self, requests_file: str | None = None) -> JsonDict:
        whole = self.whole()
        per_gpu, per_node = gpu_totals(whole, node=self.node)
        points = []
        if self.sweep:
            for p in self.phases:
                p_gpu, p_node = gpu_totals(p, node=self.node)
                points.append({
                    "point": p.point,
                    "summary": summarize(p, gpus=self.gpus, limits=self.limits),
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
            "requests_file": requests_file,
        }

    def request_rows(self) -> Iterator[JsonDict]:
        """One JSONL row per measured request; times relative to the run's first window."""
        origin = self.phases[0].start_s if self.phases else 0.0
        for index, phase in enumerate(self.phases):
            for r in phase.records:
                yield request_row(r, origin, index if self.sweep else None)


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


# --- atomic files ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` only when the block finishes: written to a temp
    file in the same directory, flushed, fsynced, then ``os.replace``d. On any error the temp
    file is removed and ``path`` is left as it was."""
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:
        raise ResultError(f"cannot write {path}: {exc.strerror or exc}") from exc
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; a record is an ordinary file
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_JSON_OPTS = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj, option=_JSON_OPTS) + b"\n"
    except TypeError as exc:
        raise ResultError(f"record is not serialisable: {exc}") from exc


def write_json(path: Path, obj: Any) -> None:
    data = dumps(obj)  # serialise first so a bad record never touches the file
    try:
        with atomic_writer(path) as handle:
            handle.write(data)
    except OSError as exc:
        raise ResultError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    try:
        with atomic_writer(path) as handle:
            for row in rows:
                handle.write(orjson.dumps(row) + b"\n")
    except TypeError as exc:
        raise ResultError(f"request row is not serialisable: {exc}") from exc
    except OSError as exc:
        raise ResultError(f"cannot write {path}: {exc.strerror or exc}") from exc


def requests_path(path: Path) -> Path:
    """``out.json`` -> ``out.requests.jsonl`` beside it."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(stem + REQUESTS_SUFFIX)


def write_run(result: RunResult, path: str | Path) -> Path:
    """Write the per-request JSONL, then the record that names it; both atomically."""
    path = Path(path)
    rows_path = requests_path(path)
    record = result.to_record(requests_file=rows_path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultError(f"cannot create {path.parent}: {exc.strerror or exc}") from exc
    write_jsonl(rows_path, result.request_rows())
    write_json(path, record)
    return path


# --- loading ------------------------------------------------------------------------------------
def load_json(path: str | Path) -> JsonDict:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ResultError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ResultError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ResultError(f"{path}: expected a JSON object")
    return obj


def check_schema(path: Path | str, obj: Mapping[str, Any], families: Sequence[str] = ("rackscope.run",)) -> str:
    """The record's schema string, after checking it is a known family at major version 1."""
    schema = obj.get("schema")
    if not isinstance(schema, str) or "/" not in schema:
        raise ResultError(f"{path}: no 'schema' field; not a rackscope record")
    family, _, version = schema.partition("/")
    if family not in families:
        raise ResultError(f"{path}: schema {schema!r} is not one of {', '.join(f + '/1' for f in families)}")
    if version.split(".")[0] != "1":
        raise ResultError(f"{path}: schema version {schema!r} is not supported (this rackscope reads version 1)")
    return schema


def load_run(path: str | Path) -> JsonDict:
    """Read a run record, checking the schema version and the summary's required keys."""
    obj = load_json(path)
    check_schema(path, obj)
    summary = obj.get("summary")
    if not isinstance(summary, dict):
        raise ResultError(f"{path}: 'summary' missing or not an object")
    missing = [k for k in REQUIRED_SUMMARY_KEYS if k not in summary]
    if missing:
        raise ResultError(f"{path}: summary lacks {', '.join(missing)}")
    for key in LATENCY_KEYS:
        if not isinstance(summary[key], dict):
            raise ResultError(f"{path}: summary.{key} must be an object of percentiles")
    for key in ("config", "environment"):
        if not isinstance(obj.get(key), dict):
            raise ResultError(f"{path}: {key!r} missing or not an object")
    return obj


def load_requests(path: str | Path) -> Iterator[JsonDict]:
    """Rows of a ``.requests.jsonl`` file."""
    for _, row in read_objects(Path(path), ResultError):
        yield row


def now_utc() -> datetime:
    return datetime.now(UTC)

