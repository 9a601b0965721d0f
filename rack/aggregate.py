"""Rack arithmetic over per-node entries: summary, stragglers, summed series, pooled latency."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rackscope.jsontypes import JsonDict
from rackscope.rack.spec import DEFAULT_STRAGGLER_THRESHOLD
from rackscope.runner.results.io import load_requests
from rackscope.runner.results.stats import distribution

log = logging.getLogger(__name__)

# The rack series is at most this many buckets: nodes whose starts lie so far apart (a clock
# set wrong) that summing them would need more are left out of it.
MAX_RACK_BUCKETS = 1_000_000


def num(value: Any) -> float | None:
    """A JSON number as a float; anything else (``true`` included) as None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def spread(values: Sequence[float]) -> JsonDict:
    if not values:
        return {"count": 0, "min": None, "median": None, "mean": None, "max": None}
    return {
        "count": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "mean": math.fsum(values) / len(values),
        "max": max(values),
    }


def summarize_nodes(nodes: Sequence[JsonDict], *, threshold: float = DEFAULT_STRAGGLER_THRESHOLD) -> JsonDict:
    """The rack summary from per-node entries (``node_entry``). Only nodes whose run completed
    count towards throughput and energy; the others are listed in ``failed_nodes``. Marks the
    stragglers in ``nodes`` in place."""
    measured = [n for n in nodes if n["status"] == "completed" and n["output_tokens_per_s"] is not None]
    rates = [float(n["output_tokens_per_s"]) for n in measured]
    rate_spread = spread(rates)
    median = rate_spread["median"]
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
        "node_output_tokens_per_s": rate_spread,
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
    """Rack output tokens/s and power per bucket: each completed node's series, shifted by its
    start relative to the earliest node, summed. Nodes on another bucket width than the first
    (they cannot share its grid), or starting too far from the others, are left out."""
    series: list[tuple[float, JsonDict]] = []
    for n in entries:
        record = records.get(n["key"])
        ts = record.get("timeseries") if record else None
        if n["status"] != "completed" or not isinstance(ts, dict) or n["started_at"] is None:
            continue
        series.append((float(n["started_at"]), ts))
    if not series:
        return None
    origin = min(s for s, _ in series)
    bucket_s = float(series[0][1].get("bucket_s") or 1.0)
    placed: list[tuple[int, JsonDict]] = []
    for start, ts in series:
        shift = round((start - origin) / bucket_s)
        end = shift + len(ts.get("output_tokens_per_s") or [])
        if float(ts.get("bucket_s") or 1.0) != bucket_s or end > MAX_RACK_BUCKETS:
            log.warning(
                "a node's time series does not fit the rack's (bucket %s s, start +%.0f s): left out",
                ts.get("bucket_s"),
                start - origin,
            )
            continue
        placed.append((shift, ts))
    length = max((shift + len(ts.get("output_tokens_per_s") or []) for shift, ts in placed), default=0)
    tokens = [0.0] * length
    power: list[float] | None = [0.0] * length
    for shift, ts in placed:
        node_tokens = ts.get("output_tokens_per_s") or []
        for i, v in enumerate(node_tokens):
            tokens[shift + i] += float(v)
        node_power = ts.get("power_w")
        if node_power is None:
            power = None
        elif power is not None:
            for i, v in enumerate(node_power[: len(node_tokens)]):
                power[shift + i] += float(v)
    return {
        "bucket_s": bucket_s,
        "t_s": [i * bucket_s for i in range(length)],
        "output_tokens_per_s": tokens,
        "power_w": power,
        "nodes": len(placed),
    }


def pooled_latency(request_files: Iterable[Path]) -> JsonDict:
    """Latency distributions over every node's finished requests (from their JSONL rows)."""
    pools: dict[str, list[float]] = {"ttft_s": [], "tpot_s": [], "e2e_s": []}
    for path in request_files:
        for row in load_requests(path):
            if row.get("ok") is not True:
                continue
            for key, values in pools.items():
                value = num(row.get(key))
                if value is not None and math.isfinite(value):
                    values.append(value)
    return {key: distribution(values) for key, values in pools.items()}


__all__ = ["MAX_RACK_BUCKETS", "num", "pooled_latency", "rack_timeseries", "spread", "summarize_nodes"]
