"""The time series of a measured window: 1 s buckets of output tokens/s, requests finished
and failed, and GPU power interpolated from the energy readings."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from rackscope.jsontypes import JsonDict
from rackscope.runner.records import CANCELLED
from rackscope.runner.results.window import Phase, counted

BUCKET_S = 1.0


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
