"""A measured window (``Phase``) and what it adds up to: the run summary, server-scenario
validity and goodput, and per-GPU and per-node totals (see docs/results-schema.md)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from rackscope.jsontypes import JsonDict
from rackscope.runner.records import CANCELLED, RequestRecord
from rackscope.runner.results.stats import distribution, ratio


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
        "output_tokens_per_j": ratio(output_tokens, energy_j),
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
            "output_tokens_per_j": ratio(out, energy_j),
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
