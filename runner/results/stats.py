"""Percentiles and latency distributions over plain numbers, as every record reports them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from rackscope.jsontypes import JsonDict

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0), ("p999", 99.9),
)


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


def ratio(num: float, den: float | None) -> float | None:
    """``num / den``, or ``None`` when the denominator is missing or zero (no energy source)."""
    return num / den if den else None
